"""One HTTP request served by an ASGI 3 application: the scope, `receive` and `send`.

Owns `AsgiExchange` (the server's exchange interface on one side, the ASGI callables on
the other) and `http_scope`.

Invariants:
- request body chunks are queued for `receive()`; past `_QUEUE_MAX` bytes not yet
  received the gateway stops reading the client, and reads again once the app takes
  them (backpressure in);
- `send()` of a body chunk waits while the client's socket buffer is full
  (backpressure out);
- response headers pass the gateway's choke point (`fields.check_field`); framing
  (Content-Length, Transfer-Encoding, Connection) is the gateway's: with no
  Content-Length from the app, HTTP/1.1 clients get chunked encoding;
- exactly one answer: an app that raises or returns before `http.response.start` gets a
  500 (logged with its traceback); one that fails after it has the connection dropped;
  one that does not start its response within the route's `timeout` is cancelled (504).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from edgeplane.http.fields import check_field
from edgeplane.http.request import body_drainable, head_end, log_extra
from edgeplane.http.responses import CONTINUE_100, STATUS_LINES
from edgeplane.plugins.hooks import run_response_hooks

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.asgi")

P_UPSTREAM = 2  # http.replies.P_UPSTREAM: reading paused for the integration
T_UPSTREAM = 4  # http.replies.T_UPSTREAM
_QUEUE_MAX = 64 * 1024
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade",
                      b"x-request-id", b"te", b"trailer"))


def http_scope(proto: HttpProtocol, req: Request, root_path: str, state: dict[str, Any]) -> dict[str, Any]:
    raw_path = req.base_path or req.path
    sock = proto.transport.get_extra_info("sockname") if proto.transport is not None else None
    peer = proto.transport.get_extra_info("peername") if proto.transport is not None else None
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": req.version, "method": req.method.decode("latin-1"),
        "scheme": proto.scheme.decode("latin-1"),
        "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"), "raw_path": raw_path,
        "query_string": req.query, "root_path": root_path,
        "headers": [(k, v) for k, v in req.headers],
        "client": (req.client_ip or proto.peer_ip, peer[1] if isinstance(peer, tuple) else 0),
        "server": (sock[0], sock[1]) if isinstance(sock, tuple) else None,
        "state": state,
    }


class AsgiExchange:
    __slots__ = ("integ", "proto", "req", "queue", "queued", "complete", "disconnected", "wake", "writable",
                 "started", "finished", "chunked", "keep", "task", "deadline", "head_only", "no_body", "declared",
                 "sent")

    def __init__(self, integ: Any, proto: HttpProtocol, req: Request) -> None:
        self.integ = integ
        self.proto = proto
        self.req = req
        self.queue: list[bytes] = list(req.body_buf or ())
        req.body_buf = None
        self.queued = sum(map(len, self.queue))
        self.complete = req.complete
        self.disconnected = False
        self.wake = asyncio.Event()  # a body chunk, the end of the body, or a disconnect
        self.writable = asyncio.Event()
        self.writable.set()
        self.started = False  # http.response.start was sent
        self.finished = False  # the response ended (or the exchange was abandoned)
        self.chunked = False
        self.keep = True
        self.task: asyncio.Task[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.head_only = req.method == b"HEAD"
        self.no_body = self.head_only  # (also for a 204 or 304: set when the response starts)
        self.declared: int | None = None  # the app's Content-Length
        self.sent = 0  # body bytes the app sent

    @property
    def timeout(self) -> float:
        return self.integ.timeout

    def start(self, scope: dict[str, Any]) -> None:
        loop = self.proto.loop
        self.task = loop.create_task(self._run(scope))
        self.integ.tasks.add(self.task)
        self.task.add_done_callback(self.integ.tasks.discard)
        self.deadline = loop.call_later(self.integ.timeout, self._head_timeout)

    async def _run(self, scope: dict[str, Any]) -> None:
        req = self.req
        t0 = time.perf_counter()
        try:
            await self.integ.app(scope, self.receive, self.send)
        except asyncio.CancelledError:
            if not self.finished and not self.started:
                self._fail(504, f"ASGI app {self.integ.name} did not start its response within "
                                f"{self.integ.timeout:g}s")
            return
        except BaseException as exc:  # SystemExit too: the app's failure, never the gateway's end
            if self.disconnected:  # the client left: the app's send() said so (not an error of ours)
                log.debug("ASGI app %s: the client left (request %s)", self.integ.name,
                          req.request_id.decode("latin-1"))
                return
            log.error("ASGI app %s raised (request %s)", self.integ.name, req.request_id.decode("latin-1"),
                      exc_info=(type(exc), exc, exc.__traceback__), extra=log_extra(req))
            self._fail(500, f"ASGI app {self.integ.name} raised {type(exc).__name__}")
            return
        finally:
            if req.integration_latency is None:
                req.integration_latency = time.perf_counter() - t0
        if not self.finished:
            self._fail(500, f"ASGI app {self.integ.name} returned without completing its response")

    # -- receive ------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        if self.req.expect_continue and not self.req.complete and not self.started:
            self.req.expect_continue = False  # once: the app reads the body it was promised
            self.proto.write(CONTINUE_100)
        while True:
            if self.disconnected or self.finished:
                return {"type": "http.disconnect"}
            if self.queue or self.complete:
                body = b"".join(self.queue)
                self.queue.clear()
                self.queued = 0
                self.proto.resume_reading(P_UPSTREAM)
                more = not self.complete
                if not more:
                    self.complete = False  # handed over: the next receive() waits for a disconnect
                return {"type": "http.request", "body": body, "more_body": more}
            self.wake.clear()
            await self.wake.wait()

    # -- send ---------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        if self.finished:
            if self.disconnected:
                raise OSError("the client disconnected")
            return
        kind = message.get("type")
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self._start_response(int(message.get("status", 200)), list(message.get("headers") or ()))
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            body = bytes(message.get("body") or b"")
            more = bool(message.get("more_body", False))
            self.sent += len(body)
            if self.declared is not None and self.sent > self.declared:
                raise RuntimeError(f"response body longer than its Content-Length ({self.declared})")
            if body and not self.no_body:
                self.req.response_length += len(body)
                self.proto.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)
            if not more:
                if self.declared is not None and self.sent < self.declared and not self.no_body:
                    raise RuntimeError(f"response body shorter ({self.sent}) than its Content-Length "
                                       f"({self.declared})")
                self._end_response()
            elif self.proto.write_paused:
                self.writable.clear()
                await self.writable.wait()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _start_response(self, status: int, raw_headers: list[Any]) -> None:
        req, proto = self.req, self.proto
        if status not in STATUS_LINES or status < 200:
            raise RuntimeError(f"status {status} cannot start a response")
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        lines: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        for name, value in raw_headers:
            name, value = bytes(name).lower(), bytes(value)
            check_field(name, value)  # UnsafeField: the app's bug, answered 500
            if name == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 18:
                    raise RuntimeError(f"invalid or repeated Content-Length {value!r}")
                length = value
                self.declared = int(value)
            elif name not in _FRAMING:
                lines.append((name, value))
        if status in (204, 304):
            self.no_body = True
            self.declared = None
        if req.route.response_hooks and not req.hooks_failed:
            visible = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in lines]
            status = run_response_hooks(proto, req, status, visible)
            lines = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in visible]
        keep = req.keep_alive and not proto.ctx.draining and (req.complete or body_drainable(req))
        parts = [STATUS_LINES[status]]
        if not any(name == b"date" for name, _ in lines):
            parts.append(proto.ctx.date.line)
        for name, value in lines:
            parts += (name, b": ", value, b"\r\n")
        if length is not None and status not in (204, 304):
            parts += (b"content-length: ", length, b"\r\n")
        elif status not in (204, 304) and not self.head_only:
            if req.version == "1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                self.chunked = True
            else:
                keep = False  # HTTP/1.0: the body ends when the connection closes
        parts.append(head_end(req, keep))
        self.keep = keep
        self.started = True
        req.status = req.integration_status = status
        req.response_started = True
        proto.write(b"".join(parts))

    def _end_response(self) -> None:
        if self.chunked:
            self.proto.write(b"0\r\n\r\n")
        self.finished = True
        self.proto.resume_reading(P_UPSTREAM)
        self.proto.finish_response(self.req, self.keep)

    def _fail(self, status: int, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        req, proto = self.req, self.proto
        if proto._closed or req.responded:
            return
        req.integration_error = reason
        proto.resume_reading(P_UPSTREAM)
        if self.started:
            proto.fail_active(req, status, reason)  # the head went out: the connection is dropped
        else:
            proto.send_error(req, status, reason)

    def _head_timeout(self) -> None:
        self.deadline = None
        if not self.started and self.task is not None:
            self.task.cancel()

    # -- the server's exchange interface --------------------------------------------------
    def on_request_body(self, chunk: bytes) -> None:
        self.queue.append(chunk)
        self.queued += len(chunk)
        if self.queued > _QUEUE_MAX:
            self.proto.pause_reading(P_UPSTREAM)
        self.wake.set()

    def on_request_complete(self) -> None:
        self.complete = True
        self.wake.set()

    def abort(self, reason: str) -> None:
        """The client left (or the gateway failed): the app sees http.disconnect."""
        self.disconnected = True
        self.finished = True
        self.wake.set()
        self.writable.set()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def request_stalled(self) -> bool:
        return not self.started and not self.complete

    def on_timeout(self) -> None:
        pass  # the head deadline is this exchange's own timer

    def pause_upstream(self) -> None:
        self.writable.clear()

    def resume_upstream(self) -> None:
        self.writable.set()
