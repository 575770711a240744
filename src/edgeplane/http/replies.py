"""Answers and deadlines of a client connection: the output half of `HttpProtocol`.

Owns writing local replies (with the route's response hooks), finishing a response
(log hooks, access log, keep-alive or close, lingering close), internal errors as 500,
and the one timer per connection with what each deadline kind does when it passes.
`HttpProtocol` (`protocol`) inherits this; the attributes annotated below are its.

Invariants (with `protocol`'s):
- a response is finished exactly once: `finish_response` marks it, logs it once and
  moves the connection on (next request, keep-alive wait, close or lingering close);
- one timer per connection, moved lazily: a later deadline costs a float store; the
  timer reschedules itself when it fires early;
- an exception inside the gateway answers 500 once (or drops a started response), with
  its traceback logged once; response hooks are skipped for that 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from edgeplane.http import responses
from edgeplane.http.request import Request, body_drainable, log_extra
from edgeplane.plugins.hooks import run_log_hooks, run_response_hooks

if TYPE_CHECKING:
    from edgeplane.http.context import ServerContext

log = logging.getLogger("edgeplane.server")

# Timer kinds: what happens when the connection's deadline passes.
T_NONE = 0
T_FIRST = 1  # connected, no byte yet -> close quietly
T_HEAD = 2  # head incomplete -> 408
T_BODY = 3  # request body stalled (local reply pending) -> 408
T_UPSTREAM = 4  # waiting for the integration -> 504 (408 if the client stalls its body)
T_SEND = 5  # client stopped reading our response -> abort
T_KEEPALIVE = 6  # idle keep-alive -> close quietly
T_LINGER = 7  # answered and half-closed, dropping what the client still sends -> close
T_BODY_RATE = 8  # request body being read for the integration: its rate window ended

# A drain (stop, takeover) leaves an idle connection this long to send one more request,
# answered with `Connection: close`, before closing it quietly. Closing it at once would
# fail any request already on its way: on a busy keep-alive connection, or a connection
# the kernel queued to a listener the successor shares, there always is one.
DRAIN_IDLE_GRACE = 1.0

# Reasons to pause reading from the client (bitmask).
P_PIPELINE = 1  # too many parsed requests waiting
P_UPSTREAM = 2  # upstream write buffer above its high-water mark
P_DEAD = 4  # parser failed; nothing more to read
P_BUFFER = 8  # body buffered while waiting for an upstream connection



class Replies:
    """Mixin: the output and timer methods of `protocol.HttpProtocol`."""

    # The connection timer: one handle, moved lazily (see `set_deadline`).
    __slots__ = ("_timer", "_timer_at", "_deadline", "_timer_kind")
    _timer: asyncio.TimerHandle | None
    _timer_at: float
    _deadline: float
    _timer_kind: int

    # Connection state owned by HttpProtocol (declared here for the type checker).
    ctx: ServerContext
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    write_paused: bool
    _active: Request | None
    _queue: deque[Request]
    _closed: bool
    _peer_eof: bool
    _parser_dead: bool
    _pause: int
    _upgrade_tail: bytearray | None
    _last_parsed: Request | None

    def _advance(self) -> None: ...
    def resume_http(self) -> None: ...
    def _stop_parsing(self) -> None: ...
    def _parse_failed(self, status: int, reason: str) -> None: ...
    def _close_after_response(self, linger: bool = False) -> None: ...

    # ------------------------------------------------------------------ output
    def internal_error(self, req: Request, exc: BaseException, where: str) -> None:
        """A bug inside the gateway (a stage, an integration, a plugin's hook): logged once
        with its traceback and request id, counted, answered 500 (or the connection is
        dropped when the response has started). The worker and other clients go on."""
        self.ctx.count_error("internal")
        log.error("internal error in %s (request %s)", where, req.request_id.decode("latin-1"),
                  exc_info=(type(exc), exc, exc.__traceback__), extra=log_extra(req))
        req.pending = False
        if req.responded or self._closed:
            return
        if req.exchange is not None:
            req.exchange.abort("internal error")
        req.hooks_failed = True  # the 500 goes out without the route's response hooks
        reason = f"internal error in {where}: {exc.__class__.__name__}"
        if req.response_started:
            self._abort_active(req, 500, reason)
        else:  # the request itself was fine: the connection stays usable
            self.send_error(req, 500, reason)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def send_local(
        self,
        req: Request,
        status: int,
        body: bytes,
        content_type: bytes = responses.JSON_TYPE,
        extra: bytes = b"",
        close: bool = False,
    ) -> None:
        """Answer `req` (which must be active and not yet started) from the gateway."""
        keep = req.keep_alive and not close and not self.ctx.draining and not self._peer_eof
        if keep and not req.complete and not body_drainable(req):
            keep = False
        route = req.route
        if route is not None and route.response_hooks and not req.hooks_failed:
            try:
                status, extra = _hooked_head(self, req, status, content_type, extra)
            except Exception as exc:
                self.internal_error(req, exc, f"a response hook of route {req.route_key!r}")
                return
        data = responses.local_reply(
            status,
            body,
            content_type=content_type,
            keep_alive=keep,
            http10=req.version == "1.0",
            date=self.ctx.date.line,
            request_id=req.request_id or None,
            extra=extra + req.extra_response if req.extra_response else extra,
            head_only=req.method == b"HEAD",
        )
        req.status = status
        req.response_length = len(body)
        req.response_started = True
        self.transport.write(data)
        self.finish_response(req, keep)

    def send_error(self, req: Request, status: int, reason: str, extra: bytes = b"",
                   message: str | None = None) -> None:
        """A gateway error: AWS-style body (`{"message": message}`, by default the status's
        AWS message), counted, and logged once (access log)."""
        req.error = reason
        self.ctx.count_error(str(status))
        config = getattr(self.ctx.snapshot, "config", None)
        custom = config.policies.get("gateway_responses") if config is not None else None
        if custom is not None:  # `policies.gateway_responses`: the API's own answer for this type
            try:
                changed = custom.answer(self, req, status, message)
            except Exception:  # e.g. a header its template made unsafe: the default answer instead
                self.ctx.count_error("internal")
                log.exception("gateway_responses: the %d answer could not be built (request %s)", status,
                              req.request_id.decode("latin-1"), extra=log_extra(req))
                changed = None
            if changed is not None:
                status, body, content_type, lines = changed
                self.send_local(req, status, body, content_type, extra + lines)
                return
        body = responses.gateway_error_body(status) if message is None else responses.error_body(message)
        self.send_local(req, status, body, extra=extra)

    def finish_response(self, req: Request, keep_alive: bool) -> None:
        """The response to the active request is fully written."""
        req.responded = True
        route = req.route
        if route is not None and route.log_hooks:
            ctx = self.ctx
            ctx.count(req)
            if ctx.tracer is not None:
                ctx.trace_done(req, self)
            access_log = ctx.access_log
            if access_log.enabled:
                access_log.record(req, self)
            run_log_hooks(route.log_hooks, access_log.fields(req, self))
        else:
            self.ctx.request_done(req, self)
        req.exchange = None  # breaks the req <-> exchange cycle: freed by refcount, not GC
        if not keep_alive or self.ctx.draining:
            # Linger when the client may still be sending: after a parse failure, or
            # with a request body that was not read to its end.
            self._close_after_response(
                self._parser_dead or (not req.complete and (req.chunked or bool(req.content_length)))
            )
        elif req.complete:
            refused_upgrade = self._upgrade_tail is not None and req is self._last_parsed
            self._advance()
            if refused_upgrade:  # this response refused the upgrade: the connection stays HTTP
                self.resume_http()
        else:
            # The body is still arriving; it is read and dropped, then we move on.
            self.set_deadline(T_BODY, self.ctx.limits.body_timeout)

    def abort(self) -> None:
        """Drop the connection without a reply (response already started)."""
        self._stop_parsing()
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ timers
    def drain_idle(self) -> None:
        """The gateway drains while this connection is idle: `DRAIN_IDLE_GRACE` (or its
        own sooner deadline) for one more request, then it closes quietly."""
        if self._timer_kind in (T_FIRST, T_KEEPALIVE):
            left = self._deadline - self.loop.time()
            self.set_deadline(self._timer_kind, max(0.0, min(DRAIN_IDLE_GRACE, left)))

    def set_deadline(self, kind: int, seconds: float) -> None:
        self._timer_kind = kind
        if kind == T_NONE:
            return
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)
        elif deadline < self._timer_at:
            timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == T_NONE or self._closed:
            return
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timer_kind = T_NONE
        if kind == T_FIRST or kind == T_KEEPALIVE:
            if kind == T_FIRST:  # connected and never sent a byte: counted, not logged
                self.ctx.count_error("no_request")
            if self.write_paused:
                self.transport.abort()  # close() would wait for a reader that never reads
            else:
                self.transport.close()
        elif kind == T_HEAD:
            self._parse_failed(408, "request head not received in time")  # counted as "408"
        elif kind == T_LINGER:
            self.transport.close()
        elif kind == T_BODY:
            self.ctx.count_error("body_timeout")
            self.abort()
        elif kind == T_UPSTREAM:
            req = self._active
            if req is None or req.exchange is None:
                self.abort()
            elif not req.complete and req.exchange.request_stalled():
                req.exchange.abort("client did not send the request body in time")
                self.fail_active(req, 408, "request body not received in time")
            else:
                req.exchange.on_timeout()
        elif kind == T_BODY_RATE:
            req = self._active
            if req is None or req.exchange is None:
                self.abort()
            else:
                req.exchange.on_body_window()
        elif kind == T_SEND:
            self.ctx.count_error("send_timeout")
            req = self._active
            if req is not None and not req.responded:
                if req.exchange is not None:
                    req.exchange.abort("client stopped reading")
                req.responded = True  # counted and logged here, not again as a 499
                req.error = "client stopped reading the response"
                self.ctx.request_done(req, self)
            self.abort()

    def fail_active(self, req: Request, status: int, reason: str) -> None:
        if req.response_started:
            self._abort_active(req, status, reason)
        else:
            req.keep_alive = False
            self.send_error(req, status, reason)

    def _abort_active(self, req: Request, status: int, reason: str) -> None:
        """A failure after the response started: dropping the connection is the only
        honest signal left. Counted and logged once (connection_lost then skips it)."""
        if not req.responded:
            req.responded = True
            req.error = reason
            self.ctx.count_error(str(status))
            self.ctx.request_done(req, self)
        self.abort()


def _hooked_head(proto: Any, req: Request, status: int, content_type: bytes,
                 extra: bytes) -> tuple[int, bytes]:
    """A local reply's status and extra header lines after the route's response hooks."""
    lines = [line.split(b": ", 1) for line in (extra + req.extra_response).split(b"\r\n") if line]
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in lines]
    req.extra_response = b""
    status = run_response_hooks(proto, req, status, headers)
    return status, b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
