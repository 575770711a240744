"""A WebSocket handshake on an `asgi` route: the ASGI `websocket` scope, served in
process (Starlette's `WebSocketRoute`, FastAPI's `@app.websocket`).

Owns `AsgiWebSocket`: the app's task and its `receive`/`send`, the opening handshake the
app decides (`websocket.accept`: 101, with its subprotocol and headers, and the
connection taken over from HTTP; `websocket.close` before that: 403, as the ASGI spec
says), then the frames, through wsproto: messages to `websocket.receive` (fragments
joined, up to the route's `websocket.max_message_bytes`, past it close 1009), pings
answered, the close handshake, and `websocket.disconnect` with its code; the route's
`websocket` limits as for every WebSocket (idle timeout and lifetime: close 1001; the
gateway's pings, an unanswered one ends the connection).

Invariants: the access log gets one line when the connection ends (101, the app's
close code); the gateway's stop closes it with 1001, like every WebSocket; `send()`
waits while the client's socket buffer is full; after a disconnect `send()` raises
(the ASGI spec's `OSError`), and an app that raises is logged and closed with 1011.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from edgeplane.http.fields import check_field
from edgeplane.http.request import header, log_extra
from edgeplane.websocket.handshake import accept_key, client_handshake_error

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.asgi")

CLOSE_WAIT = 2.0  # after our close frame, the client's time to answer


class AsgiWebSocket(asyncio.Protocol):
    def __init__(self, integ: Any, proto: HttpProtocol, req: Request, limits: Any) -> None:
        self.integ, self.proto, self.req = integ, proto, req
        self.limits = limits  # `config.model.WebSocketLimits` of the route
        self.max_message = limits.max_message_bytes
        self.last_active = 0.0
        self.opened = 0.0
        self.pong_due = float("inf")
        self.timer: asyncio.TimerHandle | None = None
        self.ws = Connection(ConnectionType.SERVER)
        self.inbox: deque[dict[str, Any]] = deque([{"type": "websocket.connect"}])
        self.wake = asyncio.Event()
        self.wake.set()
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.Transport | None = None
        self.accepted = self.closing = self.ended = False
        self.parts: list[Any] = []
        self.size = 0
        self.close_code: int | None = None
        self.task: asyncio.Task[None] | None = None

    # -- the app ------------------------------------------------------------------------
    def start(self, scope: dict[str, Any]) -> None:
        problem = client_handshake_error(self.req.headers)
        if problem is not None:
            status, reason = problem
            self.proto.send_error(self.req, status, reason,
                                  extra=b"sec-websocket-version: 13\r\n" if status == 426 else b"")
            return
        offered = [p.strip() for v in (val for k, val in self.req.headers if k == b"sec-websocket-protocol")
                   for p in v.decode("latin-1").split(",") if p.strip()]
        scope = {**scope, "type": "websocket", "scheme": "wss" if scope["scheme"] == "https" else "ws",
                 "subprotocols": offered}
        self.task = self.proto.loop.create_task(self._run(scope))
        self.integ.tasks.add(self.task)
        self.task.add_done_callback(self.integ.tasks.discard)

    async def _run(self, scope: dict[str, Any]) -> None:
        raised = timed_out = False
        deadline = self.proto.loop.call_later(self.integ.timeout, self._decide_in_time)
        try:
            await self.integ.app(scope, self.receive, self.send)
        except asyncio.CancelledError:
            timed_out = not self.accepted
        except BaseException as exc:  # the app's failure (SystemExit too): 500, or close 1011
            raised = True
            if not self.ended:
                log.error("ASGI app %s raised on a WebSocket (request %s)", self.integ.name,
                          self.req.request_id.decode("latin-1"), exc_info=(type(exc), exc, exc.__traceback__),
                          extra=log_extra(self.req))
        finally:
            deadline.cancel()
        if not self.accepted:  # returned (403, as uvicorn), raised (500) or too slow (504)
            if not self.ended and not self.req.responded and not self.proto._closed:
                self.ended = True
                status = 504 if timed_out else 500 if raised else 403
                self.proto.send_error(self.req, status, f"ASGI app {self.integ.name} did not accept the WebSocket")
        elif not self.ended:  # returned without closing: 1000 (as uvicorn); raised: 1011
            self._close(1011 if raised else self.close_code or 1000, "")

    def _decide_in_time(self) -> None:
        """The app neither accepted nor refused within the route's timeout."""
        if not self.accepted and self.task is not None:
            self.task.cancel()

    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            self.wake.clear()
            await self.wake.wait()
        return self.inbox.popleft()

    async def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self.ended:
            raise OSError("the WebSocket is closed")
        if kind == "websocket.accept":
            if self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            self._accept(message)
        elif kind == "websocket.close":
            if not self.accepted:  # refused before the handshake: 403 (ASGI spec)
                self.ended = True
                self.proto.send_error(self.req, 403, f"ASGI app {self.integ.name} refused the WebSocket")
                return
            self._close(int(message.get("code") or 1000), str(message.get("reason") or ""))
        elif kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            text, data = message.get("text"), message.get("bytes")
            event: Any = TextMessage(data=text) if text is not None else BytesMessage(data=bytes(data or b""))
            self._write(self.ws.send(event))
            self.last_active = self.proto.loop.time()
            if not self.writable.is_set():
                await self.writable.wait()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    # -- the handshake ------------------------------------------------------------------
    def _accept(self, message: dict[str, Any]) -> None:
        proto, req = self.proto, self.req
        key = header(req, b"sec-websocket-key") or b""
        head = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n",
                b"sec-websocket-accept: ", accept_key(key), b"\r\n", b"x-request-id: ", req.request_id, b"\r\n"]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            head += (b"sec-websocket-protocol: ", str(subprotocol).encode("latin-1"), b"\r\n")
        for name, value in message.get("headers") or ():
            name, value = bytes(name).lower(), bytes(value)
            check_field(name, value)
            if name not in (b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-protocol",
                            b"content-length", b"transfer-encoding"):
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        proto.transport.write(b"".join(head))
        paused = proto.write_paused
        transport, tail = proto.detach()
        self.transport = transport
        self.accepted = True
        transport.set_protocol(self)
        proto.ctx.websockets.add(self)
        self.opened = self.last_active = proto.loop.time()
        self._tick()
        if paused:
            self.pause_writing()
        if tail:
            self.data_received(tail)

    def _tick(self) -> None:
        """The connection's timers (the route's `websocket` limits): idle, lifetime, pings."""
        self.timer = None
        if self.ended or self.closing:
            return
        lim, now = self.limits, self.proto.loop.time()
        if now >= self.pong_due:
            self.close_code = 1006
            if self.transport is not None:
                self.transport.abort()  # a ping unanswered: the client is gone
            return
        if now >= self.last_active + lim.idle_timeout:
            self._close(1001, "idle timeout")
            return
        if now >= self.opened + lim.max_lifetime:
            self._close(1001, "connection lifetime reached")
            return
        if lim.ping_interval and self.pong_due == float("inf") and now >= self.last_active + lim.ping_interval:
            self._write(self.ws.send(Ping(payload=b"edgeplane")))
            self.pong_due = now + lim.pong_timeout
        at = min(self.last_active + lim.idle_timeout, self.opened + lim.max_lifetime, self.pong_due,
                 self.last_active + lim.ping_interval if lim.ping_interval else float("inf"))
        self.timer = self.proto.loop.call_at(max(at, now + 0.05), self._tick)

    # -- frames -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.ended:
            self.req.response_length += len(data)
            self.transport.write(data)

    def _push(self, message: dict[str, Any]) -> None:
        self.inbox.append(message)
        self.wake.set()

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self.last_active = self.proto.loop.time()
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Pong):
                self.pong_due = float("inf")
                continue
            if isinstance(event, (TextMessage, BytesMessage)):
                self.size += len(event.data)
                if self.size > self.max_message:
                    self._close(1009, "message too big")
                    return
                self.parts.append(event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        self._push({"type": "websocket.receive", "text": "".join(self.parts)})
                    else:
                        self._push({"type": "websocket.receive", "bytes": b"".join(self.parts)})
                    self.parts, self.size = [], 0
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:  # (not once a close is under way)
                    self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                state = self.ws.state
                if state is ConnectionState.REMOTE_CLOSING:
                    self._write(self.ws.send(event.response()))
                elif state is ConnectionState.OPEN:  # a protocol error wsproto found: say its code
                    self._write(self.ws.send(CloseConnection(code=event.code, reason=event.reason)))
                if self.close_code is None:
                    self.close_code = int(event.code)
                self._push({"type": "websocket.disconnect", "code": int(event.code)})
                if self.transport is not None:
                    self.transport.close()

    def _close(self, code: int, reason: str) -> None:
        if self.closing or self.ended or self.transport is None:
            return
        self.closing = True
        self.close_code = code
        if self.ws.state is ConnectionState.OPEN:
            self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
        transport = self.transport
        self.proto.loop.call_later(CLOSE_WAIT, lambda: None if transport.is_closing() else transport.abort())

    def close(self, code: int, reason: str) -> None:
        """The gateway stops: 1001 (`ServerContext.websockets`)."""
        self._close(code, reason)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
        self.writable.set()
        code = self.close_code if self.close_code is not None else 1006
        self._push({"type": "websocket.disconnect", "code": code})
        ctx = self.proto.ctx
        ctx.websockets.discard(self)
        req = self.req
        req.status = 101
        if code not in (1000, 1001, 1005):
            req.error = f"websocket closed {code}"
        ctx.request_done(req, self.proto)
