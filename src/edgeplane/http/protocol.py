"""The downstream HTTP/1.1 server: one `asyncio.Protocol` per client connection.

Owns the client side of a request: parsing (via `codec`), limits, timeouts, pipelining,
keep-alive, routing a parsed head to its compiled route, and writing local replies.
Proxying lives in `upstream.proxy`; this module only hands the active request to the
route's integration. Writing answers and the connection's deadlines are the inherited
`replies.Replies` half (`write`, `send_local`, `send_error`, `finish_response`, timers);
the WebSocket hand-over is the inherited `upgrade.Upgrades` half.

Per-connection state lives on `HttpProtocol`; per-request state on `Request` (kept apart,
as uvicorn does). Shared per-worker state (snapshot, counters, access log, Date header)
lives on `ServerContext`.

Invariants:
- Responses go out strictly in request order. Exactly one request is *active* (being
  answered); requests parsed behind it wait in `_queue` with their bodies buffered, and
  reading pauses while that queue is full.
- A request is finished when its response is finished and its body fully read; only then
  does the next queued request become active.
- Once the parser fails, nothing more is parsed on the connection: the error is answered
  in order and the connection closes after it.
- One timer per connection (`_timer`), moved lazily: setting a later deadline costs a float
  store; the timer reschedules itself when it fires early.
- No exception text reaches a client: every rejection is a JSON `{"message": ...}` reply.
- Closing while the client may still be sending (a refused or unread body, bytes after
  a parse error) is a lingering close (RFC 9112 9.6): FIN after the answer, then what
  arrives is read and dropped until the client closes or `_LINGER_SECONDS` pass, so a
  reset cannot destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from edgeplane.http.codec import HeadTooLarge, HttpParserError, HttpParserUpgrade, header_tokens, new_request_parser
from edgeplane.http.paths import PathRejected, split_target
from edgeplane.http.replies import (  # noqa: F401
    P_BUFFER,
    P_DEAD,
    P_PIPELINE,
    P_UPSTREAM,
    T_BODY,
    T_BODY_RATE,
    T_FIRST,
    T_HEAD,
    T_KEEPALIVE,
    T_LINGER,
    T_NONE,
    T_SEND,
    T_UPSTREAM,
    Replies,
)
from edgeplane.http.request import _DRAIN_BODY_MAX, _SPECIAL_HEADERS, Request, header
from edgeplane.http.request import HeadRejected as _Reject
from edgeplane.http.request import take_special_header as _special_header
from edgeplane.http.responses import STATUS_LINES
from edgeplane.http.tls import client_subject
from edgeplane.http.upgrade import _UPGRADE_TAIL_MAX, Upgrades

if TYPE_CHECKING:
    from edgeplane.http.context import ServerContext

log = logging.getLogger("edgeplane.server")

_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,200}")
_PIPELINE_BUFFER_MAX = 256 * 1024
_LINGER_SECONDS = 2.0  # lingering close: how long unread client bytes are dropped


class _Stop(Exception):
    """Raised from `on_message_begin` once parsing has stopped: nothing after the
    message that ended the connection is parsed, dispatched or answered."""


class HttpProtocol(Upgrades, Replies, asyncio.Protocol):
    __slots__ = (
        "ctx", "loop", "transport", "parser", "peer_ip", "_parsing", "_active", "_queue",
        "_queued_bytes", "_pause", "write_paused", "_head_partial", "_head_bytes", "_head_raw",
        "_parser_dead", "_closed",
        "_peer_eof", "_last_parsed", "tls", "scheme", "client_cert_subject", "_upgrade_tail",
        "_accepted_at", "_headless",
    )

    def __init__(self, ctx: ServerContext, tls: bool = False) -> None:
        self.ctx = ctx
        self.tls = tls  # accepted on a TLS listener (the handshake is done by connection_made)
        self.scheme = b"https" if tls else b"http"  # X-Forwarded-Proto
        self.client_cert_subject: str | None = None  # mTLS: RFC 4514 subject of the client cert
        self.loop = ctx.loop
        # Set by connection_made; None only before it (nothing here runs then).
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = None
        self.peer_ip = "-"
        self._parsing: Request | None = None
        self._active: Request | None = None
        self._queue: deque[Request] = deque()
        self._queued_bytes = 0
        self._pause = 0
        self.write_paused = False  # read by the proxy: keep the send deadline while set
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._timer_kind = T_NONE
        self._head_partial = False
        self._head_bytes = 0  # head bytes seen by the parser callbacks
        self._head_raw = 0  # raw bytes of reads that fell wholly inside an unfinished head
        self._parser_dead = False
        self._closed = False
        self._peer_eof = False
        self._last_parsed: Request | None = None
        # After an upgrade request's head: the bytes that followed it (None = no upgrade).
        self._upgrade_tail: bytearray | None = None
        # Loop time of accept until the first request begins: its head deadline runs
        # from accept, so waiting before the first byte does not buy a second timeout.
        self._accepted_at = 0.0
        self._headless = True  # in ctx.headless until its first complete request head

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
        if self.tls:
            self.client_cert_subject = client_subject(transport.get_extra_info("ssl_object"))
        ctx = self.ctx
        self.parser = new_request_parser(ctx.parser_kind, self, ctx.limits.max_head_bytes)
        ctx.stats.connections_total += 1
        if not ctx.admit(self):
            self._closed = True
            self.transport.abort()  # refused at accept: no answer, the fd comes back at once
            return
        self._accepted_at = self.loop.time()
        self.set_deadline(T_FIRST, ctx.limits.head_timeout)
        if ctx.draining:  # accepted in the drain's last batch: its request is on its way
            self.drain_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.ctx.connections:
            self.ctx.release(self)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        req = self._active
        if req is not None and not req.responded:
            stopped = self.ctx.stop_reason  # set when the gateway cut it (the drain deadline)
            if req.exchange is not None:
                req.exchange.abort(stopped or "client closed connection")
            if req.dispatched:
                if stopped is None:
                    req.status = 499  # nginx's "client closed request"; never sent
                    req.error = "client closed connection"
                    self.ctx.count_error("client_closed")
                else:  # the status it had begun to send, else 503
                    req.status = req.status if req.response_started else 503
                    req.error = stopped
                    self.ctx.count_error("drain_aborted")
                self.ctx.request_done(req, self)
        self._active = None
        self._queue.clear()
        self._parsing = None
        self.parser = None

    def eof_received(self) -> bool | None:
        # A client may half-close after its last request and still read the answer.
        if self._parsing is not None:
            return None  # vanished mid-request: close (connection_lost aborts the rest)
        if self._active is not None or self._queue:
            self._peer_eof = True
            self._stop_parsing()
            return True
        return None

    def evict(self) -> None:
        """Closed to make room at the connection cap (`ServerContext.admit`); it has not
        sent a complete request head, so there is nothing to answer."""
        self._closed = True
        self._headless = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.abort()

    def pause_writing(self) -> None:
        self.write_paused = True
        req = self._active
        if req is not None and req.exchange is not None:
            req.exchange.pause_upstream()
        self.set_deadline(T_SEND, self.ctx.limits.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        req = self._active
        if req is not None and req.exchange is not None:
            req.exchange.resume_upstream()
            self.set_deadline(T_UPSTREAM, req.exchange.timeout)

    def idle(self) -> bool:
        """No request in progress: safe to close during a drain."""
        return self._active is None and self._parsing is None and not self._queue

    def pause_reading(self, reason: int) -> None:
        if not self._pause and self.transport is not None:
            self.transport.pause_reading()
        self._pause |= reason

    def resume_reading(self, reason: int) -> None:
        if self._pause & reason:
            self._pause &= ~reason
            if not self._pause and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ input
    def data_received(self, data: bytes) -> None:
        tail = self._upgrade_tail
        if tail is not None:  # bytes after an upgrade request, kept for whoever takes over
            tail += data
            if len(tail) > _UPGRADE_TAIL_MAX:
                self.pause_reading(P_BUFFER)
            return
        if self._parser_dead:
            return
        was_partial = self._head_partial
        parsing = self._parsing
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgraded(data, exc)
            return
        except _Reject as rej:  # raised by a callback under h11 (httptools wraps it)
            self._parse_failed(rej.status, rej.reason)
            return
        except _Stop:
            return
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._parse_failed(cause.status, cause.reason)
            elif isinstance(cause, _Stop):
                pass
            elif isinstance(cause, HttpParserError):  # the codec's strict checks
                self._parse_failed(400, f"malformed request: {cause}")
            elif isinstance(exc, HeadTooLarge):
                self._parse_failed(431, "request head too large")
            else:
                self._parse_failed(400, f"malformed request: {exc}")
            return
        # A head that spans reads: count the raw bytes of every read that falls wholly
        # inside it, so one endless header cannot grow the parser's buffer past the
        # limit before any callback sees it. (Counted apart from `_head_bytes`: the
        # callbacks count the same bytes again once a header line is complete.)
        if was_partial and self._head_partial and self._parsing is parsing:
            self._head_raw += len(data)
            if self._head_raw > self.ctx.limits.max_head_bytes:
                self._parse_failed(431, "request head too large")

    # parser callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._parser_dead:
            raise _Stop  # bytes after the message that ends the connection
        req = Request(time.perf_counter())
        self._parsing = req
        self._head_partial = True
        self._head_bytes = 0
        self._head_raw = 0
        if self._active is None:
            timeout = self.ctx.limits.head_timeout
            if self._accepted_at:  # the first request: its deadline counts from accept
                timeout -= self.loop.time() - self._accepted_at
                self._accepted_at = 0.0
            self.set_deadline(T_HEAD, timeout)

    def on_url(self, url: bytes) -> None:
        req: Request = self._parsing  # type: ignore[assignment]  # set while parsing
        req.target += url
        self._head_bytes += len(url)
        if self._head_bytes > self.ctx.limits.max_head_bytes:
            raise _Reject(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req: Request = self._parsing  # type: ignore[assignment]  # set while parsing
        if not self._head_partial:
            # A trailer field of a chunked body: dropped, as h11 drops them. Routing, the
            # authorizers and the Host and request-id checks ran on the head; a trailer
            # must not add to or change what they judged (it would reach the upstream).
            return  # (the codec bounds trailer sections for both parsers)
        self._head_bytes += len(name) + len(value) + 4
        limits = self.ctx.limits
        if self._head_bytes > limits.max_head_bytes:
            raise _Reject(431, "request head too large")
        name = name.lower()
        headers = req.headers
        headers.append((name, value))
        if len(headers) > limits.max_headers:
            raise _Reject(431, "too many headers")
        if name in _SPECIAL_HEADERS:
            _special_header(req, name, value)

    def on_head(self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                keep_alive: bool, upgrade: bool) -> None:
        """The native framer's one call per head (`framing`): what `on_message_begin`,
        `on_url`, `on_header` and `on_headers_complete` do for llhttp, at once. The framer
        bounds the head's bytes; names come lower-cased."""
        if self._parser_dead:
            raise _Stop  # bytes after the message that ends the connection
        req = self._parsing
        if req is None:  # the head came whole in one read: no head deadline was needed
            req = self._parsing = Request(time.perf_counter())
            self._accepted_at = 0.0
        if len(headers) > self.ctx.limits.max_headers:
            raise _Reject(431, "too many headers")
        req.target = target
        req.headers = headers
        for name, value in headers:
            if name in _SPECIAL_HEADERS:
                _special_header(req, name, value)
        req.method = method
        req.version = version
        self._head_complete(req, keep_alive, upgrade)

    def on_headers_complete(self) -> None:
        req: Request = self._parsing  # type: ignore[assignment]  # set while parsing
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        self._head_complete(req, parser.should_keep_alive(), parser.should_upgrade())

    def _head_complete(self, req: Request, keep_alive: bool, upgrade: bool) -> None:
        ctx = self.ctx
        self._head_partial = False
        if self._headless:  # the first complete head: no longer evictable at the cap
            self._headless = False
            ctx.headless.pop(self, None)
        # HTTP/1.0 with a Transfer-Encoding: faulty framing, close after (RFC 9112 6.1)
        req.keep_alive = keep_alive and not ctx.draining and not (req.chunked and req.version == "1.0")
        if upgrade:
            if req.content_length or req.chunked:
                # llhttp ends an upgrade request at its head: a declared body would be
                # neither read nor sent, and the upstream would take it as the next
                # request on a pooled connection (smuggling). Refused.
                self._refuse(req, 400, "upgrade request with a body")
            elif req.method == b"GET" and req.version == "1.1":
                # RFC 6455 4.2.1 (the parser already saw `Connection: upgrade`)
                req.websocket = b"websocket" in header_tokens(req.headers, b"upgrade")
        self._last_parsed = req
        self._check_head(req)
        if req.local_status:
            req.keep_alive = False
        if self._active is None:
            self._active = req
            self._dispatch(req)
        else:
            self._queue.append(req)
            if len(self._queue) >= ctx.limits.max_pipelined:
                self.pause_reading(P_PIPELINE)

    def on_body(self, chunk: bytes) -> None:
        req: Request = self._parsing  # type: ignore[assignment]  # set while parsing
        req.body_size += len(chunk)
        if req.body_size > self.ctx.limits.max_body_bytes:
            raise _Reject(413, "request body too large")
        exchange = req.exchange
        if exchange is not None:
            exchange.on_request_body(chunk)  # streams it, or holds it until connected
            return
        if (req.dispatched and not req.pending) or req.local_status:
            return  # answered locally (or refused): the body is read and dropped
        if req.body_buf is None:
            req.body_buf = [chunk]
        else:
            req.body_buf.append(chunk)
        if req.pending:  # held while an asynchronous stage (an authorizer call) runs
            if sum(len(b) for b in req.body_buf) > _DRAIN_BODY_MAX:
                self.pause_reading(P_BUFFER)
        elif req is not self._active:
            self._queued_bytes += len(chunk)
            if self._queued_bytes > _PIPELINE_BUFFER_MAX:
                self.pause_reading(P_PIPELINE)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is None:  # detached during this read (a WebSocket accepted synchronously)
            return
        self._parsing = None
        req.complete = True
        if req.exchange is not None:
            req.exchange.on_request_complete()
        if req is self._active:
            if req.responded:
                self._advance()
            elif req.exchange is None and req.dispatched:
                pass  # a local reply is being produced asynchronously by a stage
        if self._active is None and not self._queue:
            self.set_deadline(T_KEEPALIVE, self.ctx.limits.keepalive_timeout)

    # ------------------------------------------------------------------ validation
    def _check_head(self, req: Request) -> None:
        if req.local_status:
            return
        version = req.version
        if version != "1.1" and version != "1.0":
            if version.startswith(("0.", "1.")):
                self._refuse(req, 400, f"unsupported HTTP version {version}")
            else:
                self._refuse(req, 505, f"unsupported HTTP version {version}")
            return
        if req.method == b"CONNECT":
            self._refuse(req, 405, "CONNECT is not supported")
            return
        if req.host_count > 1:
            self._refuse(req, 400, "multiple Host headers")
            return
        if req.host_count == 0 and version == "1.1":
            self._refuse(req, 400, "missing Host header")
            return
        try:
            req.path, req.query, req.host = split_target(req.target, req.method, req.host,
                                                         self.ctx.snapshot.path_policy)
        except PathRejected as exc:
            req.path = req.target[:1024]  # logged as received (the log escapes it): what was refused
            self._refuse(req, 400, str(exc))
            return
        if req.content_length is not None and req.content_length > self.ctx.limits.max_body_bytes:
            self._refuse(req, 413, "request body too large")

    def _refuse(self, req: Request, status: int, reason: str) -> None:
        req.local_status = status
        req.local_reason = reason

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, req: Request) -> None:
        req.dispatched = True
        ctx = self.ctx
        ctx.stats.requests_total += 1
        rid = req.request_id
        if not rid or _REQUEST_ID_RE.fullmatch(rid) is None:
            ctx.rid_counter += 1
            req.request_id = b"%b%012x" % (ctx.rid_prefix, ctx.rid_counter)
        if req.local_status:
            self.send_error(req, req.local_status, req.local_reason)
            return
        snapshot = ctx.snapshot
        ws_api = snapshot.websocket_apis.get(req.path) if snapshot.websocket_apis else None
        if ws_api is not None:
            ws_api.handle(self, req)  # AWS-model WebSocket API: it answers or takes over
            return
        self.route(req)

    def route(self, req: Request) -> None:
        """Match `req` in the route table and run its route (404 when none matches).
        With stages, the stage's table (`routing.stages`; 404 when no stage matches)."""
        snapshot = self.ctx.snapshot
        if snapshot.stages is not None:
            snapshot = snapshot.stages.select(req)
            if snapshot is None:
                self.send_error(req, 404, "no stage matched")
                return
            if snapshot.websocket_apis:  # the stage's WebSocket APIs (its canary side's: kept for life)
                ws_api = snapshot.websocket_apis.get(req.path)
                if ws_api is not None:
                    ws_api.handle(self, req)
                    return
        match = snapshot.router.match(req.method, req.path, req.host, req)
        if match is None and req.method == b"OPTIONS":
            match = _preflight_route(snapshot.router, req)
        if match is None:
            self.send_error(req, 404, "no route matched")
            return
        route, params = match
        req.route = route
        req.params = params
        req.route_key = route.key
        self.run_chain(req, 0)

    def run_chain(self, req: Request, start: int) -> None:
        """Run the route's stages from `start`, then its integration. A stage returns
        True (go on), False (it answered) or None (it goes on asynchronously and calls
        `resume_chain` when done; meanwhile the request body is held). An exception from
        a stage or the integration is the gateway's: 500, never the client's 400."""
        stages = req.route.stages
        try:
            for i in range(start, len(stages)):
                result = stages[i](self, req)
                if result is not True:
                    if result is None:
                        req.pending = True
                    elif result is not False:
                        raise TypeError(f"stage {stages[i]!r} returned {type(result).__name__}; "
                                        "expected True, False or None")
                    return
            req.route.integration.handle(self, req)
        except Exception as exc:
            self.internal_error(req, exc, f"route {req.route_key!r}")

    def resume_chain(self, req: Request, start: int) -> None:
        """An asynchronous stage finished well: continue, unless the client left."""
        req.pending = False
        if self._closed or req.responded or req is not self._active:
            return
        self.resume_reading(P_BUFFER)
        self.run_chain(req, start)

    def _advance(self) -> None:
        """The active request is finished: make the next queued one active."""
        self._active = None
        if self._closed:
            return
        queue = self._queue
        if queue:
            req = queue.popleft()
            if req.body_buf is not None:
                self._queued_bytes -= sum(map(len, req.body_buf))
            if self._pause & P_PIPELINE and len(queue) < self.ctx.limits.max_pipelined:
                if self._queued_bytes <= _PIPELINE_BUFFER_MAX:
                    self.resume_reading(P_PIPELINE)
            self._active = req
            self._dispatch(req)
        elif self._parsing is None:
            if self._peer_eof:
                self.transport.close()
            else:
                self.set_deadline(T_KEEPALIVE, self.ctx.limits.keepalive_timeout)

    def _close_after_response(self, linger: bool = False) -> None:
        self._upgrade_tail = None
        self._stop_parsing()
        self._queue.clear()
        self._active = None
        transport = self.transport
        if transport is None:
            self.set_deadline(T_NONE, 0)
            return
        if linger and not self._peer_eof and not self._closed and transport.can_write_eof():
            transport.write_eof()  # FIN once the answer is flushed
            self._pause = 0
            transport.resume_reading()  # data_received drops everything now
            self.set_deadline(T_LINGER, _LINGER_SECONDS)
        else:
            self.set_deadline(T_NONE, 0)
            transport.close()

    def _stop_parsing(self) -> None:
        self._parser_dead = True
        self.pause_reading(P_DEAD)

    def _parse_failed(self, status: int, reason: str) -> None:
        """The parser (or a limit) refused the bytes: answer in order, then close."""
        if self._parser_dead:
            # Parsing already stopped inside this read (the connection is closing after
            # an answer): the rest of the bytes are not ours to judge or answer.
            return
        self._stop_parsing()
        req = self._parsing
        self._parsing = None
        self._head_partial = False
        if req is None:
            req = Request(time.perf_counter())
        elif req.dispatched:
            # The failure is in the body of the request being answered (the active one:
            # a dispatched request stays active until its body is complete).
            if req.exchange is not None:
                req.exchange.abort(reason)
            if req.response_started:
                self._abort_active(req, status, reason)
                return
            req.keep_alive = False
            self.send_error(req, status, reason)
            return
        req.local_status = status
        req.local_reason = reason
        req.keep_alive = False
        req.complete = True
        if req is self._active or req in self._queue:
            return  # already waiting for its turn; it will be refused then
        if self._active is None:
            self._active = req
            self._dispatch(req)
        else:
            self._queue.append(req)


def _preflight_route(router: Any, req: Request) -> Any:
    """A CORS preflight for a path with no OPTIONS route: the route of the method it asks
    about, when a CORS stage of that route answers preflights (as AWS HTTP APIs do)."""
    wanted = header(req, b"access-control-request-method")
    if wanted is None or header(req, b"origin") is None:
        return None
    match = router.match(wanted.strip(), req.path, req.host, req)
    if match is None or not any(getattr(s, "answers_preflights", False) for s in match[0].stages):
        return None
    return match


def status_line(status: int) -> bytes:
    return STATUS_LINES[status]
