"""A WebSocket handshake on an `asgi` route: the ASGI `websocket` scope, served in
process (Starlette's `WebSocketRoute`, FastAPI's `@app.websocket`).

Owns `AsgiWebSocket`: the app's task and its `receive`/`send`, the opening handshake the
app decides (`websocket.accept`: 101, with its subprotocol and headers, and the
connection taken over from HTTP; `websocket.close` before that: 403, as the ASGI spec
says), then the frames, through wsproto: messages to `websocket.receive` (fragments
joined, up to the route's `websocket.max_message_bytes`, past it close 1009), pings
answered, the close handshake, and `websocket.disconnect` with its code.

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
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from edgeplane.http.fields import check_field
from edgeplane.http.request import header, log_extra
from edgeplane.websocket.handshake import accept_key, client_handshake_error

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.asgi")

CLOSE_WAIT = 2.0  # after our close frame, the client's time to answer


class AsgiWebSocket(asyncio.Protocol):
    def __init__(self, integ: Any, proto: HttpProtocol, req: Request, max_message: int) -> None:
        self.integ, self.proto, self.req = integ, proto, req
        self.max_message = max_message
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
            self.proto.send_error(self.req, *problem)
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
        elif not self.ended:
            self._close(1011 if raised or self.close_code is None else self.close_code, "")

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
        if paused:
            self.pause_writing()
        if tail:
            self.data_received(tail)

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
        self.ws.receive_data(data)
        for event in self.ws.events():
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
                self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._write(self.ws.send(event.response()))
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
