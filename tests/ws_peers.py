"""Real WebSocket peers for the gateway tests, on loopback: an upstream WebSocket server
that can misbehave on purpose, and a client that does the opening handshake over a raw
socket and then speaks frames through wsproto.

- `WsUpstream(mode=...)`: `await start()`, `.port`, `.requests` (raw request heads seen),
  `.received` (messages received), `await stop()`. Modes: "echo" (default), "plain"
  (answers 200 to everything: no upgrade), "bad-accept", "extension", "bad-protocol",
  "garbage" (valid 101 then bytes that are not a frame), "close-after" (echoes one
  message, then closes with 1000 "bye").
- `WsClient`: `await WsClient.connect(addr, path, headers=...)` -> client with `.status`,
  `.head` (response head bytes), `.body`; when upgraded: `send_text`, `send_bytes`,
  `send_raw`, `await recv()` (next data message or CloseConnection event), `close()`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def _headers(head: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            out[name.strip().lower()] = value.strip()
    return out


class WsUpstream:
    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.port = 0
        self.requests: list[bytes] = []
        self.received: list[str | bytes] = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> WsUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        h = _headers(head)
        if self.mode == "plain" or b"sec-websocket-key" not in h:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nplain")
            await writer.drain()
            return
        key = h[b"sec-websocket-key"]
        good = accept(key)
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
                 b"Set-Cookie: sid=1"]
        # bad-accept: the first character changed (a fixed "x" was the good one 1 time in 64)
        bad = (b"y" if good[:1] == b"x" else b"x") + good[1:]
        lines.append(b"Sec-WebSocket-Accept: " + (bad if self.mode == "bad-accept" else good))
        offered = [p.strip() for p in h.get(b"sec-websocket-protocol", b"").split(b",") if p.strip()]
        if self.mode == "bad-protocol":
            lines.append(b"Sec-WebSocket-Protocol: not-offered")
        elif offered:
            lines.append(b"Sec-WebSocket-Protocol: " + offered[0])
        if self.mode == "extension":
            lines.append(b"Sec-WebSocket-Extensions: permessage-deflate")
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if self.mode == "garbage":
            writer.write(b"\xff\xff\xff\xff garbage")
        await writer.drain()
        ws = Connection(ConnectionType.SERVER)
        parts: list = []
        while True:
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        self.received.append("".join(parts) if isinstance(event, TextMessage) else b"".join(parts))
                        parts = []
                    writer.write(ws.send(type(event)(data=event.data, message_finished=event.message_finished)))
                    if self.mode == "close-after" and event.message_finished:
                        writer.write(ws.send(CloseConnection(code=1000, reason="bye")))
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state.name == "REMOTE_CLOSING":
                        writer.write(ws.send(event.response()))
                    await writer.drain()
                    return
            await writer.drain()


class WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.head = b""
        self.body = b""
        self.ws = Connection(ConnectionType.CLIENT)
        self._events: list = []

    @classmethod
    async def connect(cls, addr, path: str = "/ws", headers: dict[str, str] | None = None,
                      key: bytes | None = None, version: str = "13") -> WsClient:
        reader, writer = await asyncio.open_connection(*addr)
        client = cls(reader, writer)
        key = key if key is not None else base64.b64encode(os.urandom(16))
        lines = [f"GET {path} HTTP/1.1".encode(), b"Host: gw.test", b"Upgrade: websocket",
                 b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key,
                 b"Sec-WebSocket-Version: " + version.encode()]
        lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        client.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        client.status = int(client.head.split(b" ", 2)[1])
        h = _headers(client.head)
        if client.status == 101:
            assert h[b"sec-websocket-accept"] == accept(key)
        elif b"content-length" in h:
            client.body = await asyncio.wait_for(reader.readexactly(int(h[b"content-length"])), 5)
        return client

    def header(self, name: str) -> bytes | None:
        return _headers(self.head).get(name.lower().encode())

    def send_text(self, text: str, finished: bool = True) -> None:
        self.writer.write(self.ws.send(TextMessage(data=text, message_finished=finished)))

    def send_bytes(self, data: bytes, finished: bool = True) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=data, message_finished=finished)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0):
        """The next whole data message (str/bytes), or the CloseConnection event."""
        parts: list = []
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, CloseConnection):
                    if self.ws.state.name == "REMOTE_CLOSING":
                        self.writer.write(self.ws.send(event.response()))
                    return event
                if isinstance(event, Ping):
                    self.writer.write(self.ws.send(event.response()))
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return CloseConnection(code=1006, reason="TCP closed")
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.writer.write(self.ws.send(CloseConnection(code=code, reason=reason)))

    async def http(self, request: bytes) -> bytes:
        """Send a plain HTTP request on this (non-upgraded) connection; the response head."""
        self.writer.write(request)
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
