"""WebSocket test peers over real loopback sockets (wsproto-based), for any test module.

Everything here is test tooling: real asyncio transports on 127.0.0.1, no mocks.

Peers
-----
- ``WSPeer(role, *, handshake=False, ...)`` -- an ``asyncio.Protocol`` speaking WebSocket
  with wsproto in the ``"client"`` or ``"server"`` role. With ``handshake=True`` it does
  the HTTP upgrade first (client: sends the request; server: answers 101 to any valid
  upgrade request); with ``handshake=False`` frames start at once (for code that takes a
  transport over after someone else did the handshake). Received data is delivered
  **frame by frame** (partial reads of one frame are joined), so fragmentation is
  observable: ``TextMessage``/``BytesMessage`` events with ``message_finished``, plus
  ``Ping``, ``Pong`` and ``CloseConnection`` events, in wire order.

  Behaviour switches (attributes, change them any time): ``auto_pong`` (answer pings,
  default True), ``auto_close`` (answer a close with ``close_reply`` or an echo of it; the
  server role then closes TCP, default True), ``echo`` (send every data frame back as
  it came, default False), ``record_raw`` (keep every received byte in ``raw``).

  Reading: ``await recv()`` (next event), ``await recv_message()`` (next whole message,
  control frames skipped), ``await recv_close()`` (skip to the close), ``await
  wait_lost()``. Writing: ``send(event)``, ``send_text``, ``send_bytes``, ``ping``,
  ``close``, ``send_raw(bytes)`` for hand-crafted frames, ``await drain()`` (honours
  ``pause_writing``), ``abort()``. ``protocol_error`` holds the close event wsproto made
  from bytes it could not parse (None if the peer only ever saw valid frames).

- ``WSServer(**peer_kwargs)`` -- a loopback server of ``WSPeer("server")`` peers (echo by
  default). ``await server.accepted(peer_port)`` returns the peer accepted for the
  connection whose client-side port is ``peer_port``; ``handler`` (optional coroutine
  function ``handler(peer)``) runs per connection once it is open.
- ``connect_peer(port, **peer_kwargs)`` -- a connected client ``WSPeer``, opened.

Gateway-side stand-ins
----------------------
- ``Holder`` -- a placeholder protocol that owns a fresh transport and buffers what
  arrives until someone takes the transport over (``set_protocol``); its buffer is the
  "tail". ``HolderServer`` accepts connections into ``Holder`` objects.
- ``accept_upgrade(holder)`` / ``request_upgrade(holder, host, target)`` -- a minimal
  HTTP/1.1 WebSocket upgrade on a ``Holder`` (server side answers 101, client side checks
  the 101 and ``Sec-WebSocket-Accept``); both return the bytes after the head (the tail).

Raw frames
----------
- ``build_frame(opcode, payload, *, fin=True, mask=True, rsv=0, length=None)`` -- exact
  frame bytes, including invalid ones (reserved bits, unknown opcodes, lying lengths).
- ``close_payload(code, reason)`` -- the payload of a close frame.
- ``parse_frames(data)`` -- an independent, non-validating frame parser for checking
  what went on the wire (returns ``RawFrame``s and the unparsed rest).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Event, Message, Ping, Request, TextMessage
from wsproto.frame_protocol import CloseReason

__all__ = [
    "WSPeer", "WSServer", "connect_peer", "Holder", "HolderServer", "accept_upgrade",
    "request_upgrade", "build_frame", "close_payload", "parse_frames", "RawFrame",
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG", "PeerClosed",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_TIMEOUT = 5.0


class PeerClosed(ConnectionError):
    """The peer's TCP connection ended with no (more) events to read."""


# -- raw frames -------------------------------------------------------------------------

def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def build_frame(opcode: int, payload: bytes | str = b"", *, fin: bool = True, mask: bool = True,
                rsv: int = 0, length: int | None = None, key: bytes | None = None) -> bytes:
    """One frame's exact bytes. ``rsv`` is the 3-bit RSV1..3 value (0..7), ``length``
    overrides the declared payload length (the payload bytes are still all appended)."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)])
    m = 0x80 if mask else 0
    if n <= 125:
        head.append(m | n)
    elif n <= 0xFFFF:
        head.append(m | 126)
        head += struct.pack("!H", n)
    else:
        head.append(m | 127)
        head += struct.pack("!Q", n)
    if mask:
        key = key if key is not None else os.urandom(4)
        return bytes(head) + key + _mask(payload, key)
    return bytes(head) + payload


def close_payload(code: int | None = None, reason: str | bytes = b"") -> bytes:
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    return struct.pack("!H", code) + reason


class RawFrame(NamedTuple):
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes  # unmasked

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8", "replace")


def parse_frames(data: bytes) -> tuple[list[RawFrame], bytes]:
    """Split ``data`` into frames without validating them; returns (frames, rest)."""
    frames: list[RawFrame] = []
    i = 0
    while len(data) - i >= 2:
        b0, b1 = data[i], data[i + 1]
        n = b1 & 0x7F
        j = i + 2
        if n == 126:
            if len(data) - j < 2:
                break
            n = struct.unpack_from("!H", data, j)[0]
            j += 2
        elif n == 127:
            if len(data) - j < 8:
                break
            n = struct.unpack_from("!Q", data, j)[0]
            j += 8
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            if len(data) - j < 4:
                break
            key = data[j:j + 4]
            j += 4
        if len(data) - j < n:
            break
        payload = bytes(data[j:j + n])
        if masked:
            payload = _mask(payload, key)
        frames.append(RawFrame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, masked, payload))
        i = j + n
    return frames, bytes(data[i:])


# -- peers --------------------------------------------------------------------------------

class WSPeer(asyncio.Protocol):
    """A WebSocket endpoint for tests; see the module docstring."""

    def __init__(self, role: str, *, handshake: bool = False, host: str = "gw.test",
                 target: str = "/", auto_pong: bool = True, auto_close: bool = True,
                 close_reply: tuple[int, str] | None = None, echo: bool = False,
                 record_raw: bool = False,
                 on_open: Callable[[WSPeer], None] | None = None) -> None:
        if role not in ("client", "server"):
            raise ValueError("role must be 'client' or 'server'")
        self.role = role
        self.handshake = handshake
        self.host = host
        self.target = target
        self.auto_pong = auto_pong
        self.auto_close = auto_close
        self.close_reply = close_reply
        self.echo = echo
        self.record_raw = record_raw
        self.on_open = on_open
        ctype = ConnectionType.CLIENT if role == "client" else ConnectionType.SERVER
        self.ws: WSConnection | Connection = WSConnection(ctype) if handshake else Connection(ctype)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = self.loop.create_future()
        self.lost_future: asyncio.Future = self.loop.create_future()
        self.events: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._parts: list = []
        self.raw = bytearray()
        self.write_paused = False
        self.close_received: CloseConnection | None = None
        self.protocol_error: CloseConnection | None = None
        self.lost = False
        self.lost_exc: Exception | None = None
        self.eof = False
        self.request: Request | None = None  # server role with handshake: what was asked

    # -- protocol callbacks
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if not self.handshake:
            self._set_open()
        elif self.role == "client":
            transport.write(self.ws.send(Request(host=self.host, target=self.target)))

    def _set_open(self) -> None:
        if not self.opened.done():
            self.opened.set_result(self)
            if self.on_open is not None:
                self.on_open(self)

    def data_received(self, data: bytes) -> None:
        if self.record_raw:
            self.raw += data
        if self.ws.state is ConnectionState.CLOSED:
            return
        self.ws.receive_data(data)
        for ev in self.ws.events():
            self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Request):
            self.request = ev
            self.transport.write(self.ws.send(AcceptConnection()))
            self._set_open()
            return
        if isinstance(ev, AcceptConnection):
            self._set_open()
            return
        if isinstance(ev, Message):
            if not ev.frame_finished:
                self._parts.append(ev.data)
                return
            if self._parts:
                self._parts.append(ev.data)
                data = ("" if isinstance(ev, TextMessage) else b"").join(self._parts)
                self._parts = []
                ev = type(ev)(data=data, frame_finished=True, message_finished=ev.message_finished)
            if self.echo and self.ws.state is ConnectionState.OPEN:
                self.transport.write(self.ws.send(Message(data=ev.data,
                                                          message_finished=ev.message_finished)))
        elif isinstance(ev, Ping):
            if self.auto_pong and self.ws.state is ConnectionState.OPEN:
                self.transport.write(self.ws.send(ev.response()))
        elif isinstance(ev, CloseConnection):
            state = self.ws.state
            if state is ConnectionState.REMOTE_CLOSING:
                self.close_received = ev
                if self.auto_close:
                    code, reason = self.close_reply or (ev.code, ev.reason)
                    self._send_close(code, reason)
            elif state is ConnectionState.CLOSED and self.close_received is None:
                self.close_received = ev  # the reply to our close
                if self.role == "server":
                    self.transport.close()
            else:  # wsproto could not parse what it got
                self.protocol_error = ev
                self.transport.close()
        self._push(ev)

    def _push(self, ev: Event) -> None:
        self.events.append(ev)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if not self.lost_future.done():
            self.lost_future.set_result(exc)
        for w in (self._waiter, self._drain_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        if not self.opened.done():
            self.opened.set_exception(PeerClosed("closed before the handshake completed"))
            self.opened.exception()  # mark retrieved

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- writing
    def send(self, event: Event) -> None:
        self.transport.write(self.ws.send(event))

    def send_text(self, text: str, fin: bool = True) -> None:
        self.send(Message(data=text, message_finished=fin))

    def send_bytes(self, data: bytes, fin: bool = True) -> None:
        self.send(Message(data=data, message_finished=fin))

    def ping(self, payload: bytes = b"") -> None:
        self.send(Ping(payload=payload))

    def close(self, code: int | None = 1000, reason: str = "") -> None:
        self._send_close(code, reason)

    def _send_close(self, code: int | None, reason: str | None) -> None:
        if self.ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING) or self.lost:
            return
        if code is None or code == 1005:
            ev = CloseConnection(code=CloseReason.NO_STATUS_RCVD)
        else:
            ev = CloseConnection(code=code, reason=reason)
        self.transport.write(self.ws.send(ev))
        if self.ws.state is ConnectionState.CLOSED and self.role == "server":
            self.transport.close()

    def send_raw(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.lost:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    def abort(self) -> None:
        self.transport.abort()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    # -- reading
    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> Event:
        async with asyncio.timeout(timeout):
            while not self.events:
                if self.lost:
                    raise PeerClosed(f"{self.role} peer lost its connection ({self.lost_exc!r})")
                self._waiter = self.loop.create_future()
                await self._waiter
            return self.events.popleft()

    async def recv_message(self, timeout: float = DEFAULT_TIMEOUT) -> str | bytes:
        """The next whole data message (control frames skipped; a close raises)."""
        parts: list = []
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.recv(timeout)
                if isinstance(ev, CloseConnection):
                    raise PeerClosed(f"close {ev.code} {ev.reason!r} while waiting for a message")
                if isinstance(ev, Message):
                    parts.append(ev.data)
                    if ev.message_finished:
                        return ("" if isinstance(ev.data, str) else b"").join(parts)

    async def recv_close(self, timeout: float = DEFAULT_TIMEOUT) -> CloseConnection:
        """Skip to the next close event (a close frame, or wsproto's protocol error)."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.recv(timeout)
                if isinstance(ev, CloseConnection):
                    return ev

    async def wait_lost(self, timeout: float = DEFAULT_TIMEOUT) -> Exception | None:
        return await asyncio.wait_for(asyncio.shield(self.lost_future), timeout)

    def raw_frames(self) -> list[RawFrame]:
        """The frames received so far, parsed from ``raw`` (needs ``record_raw``)."""
        return parse_frames(bytes(self.raw))[0]

    def raw_close(self) -> RawFrame | None:
        """The close frame received on the wire, if any (needs ``record_raw``)."""
        for f in self.raw_frames():
            if f.opcode == OP_CLOSE:
                return f
        return None


class WSServer:
    """A loopback server of ``WSPeer("server")`` peers (``echo=True`` unless told)."""

    def __init__(self, handler: Callable[[WSPeer], Awaitable[None]] | None = None,
                 **peer_kwargs) -> None:
        peer_kwargs.setdefault("echo", True)
        self.peer_kwargs = peer_kwargs  # may be changed between connections
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.peers: list[WSPeer] = []
        self._by_port: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()

    def _factory(self) -> WSPeer:
        kwargs = dict(self.peer_kwargs)
        user_hook = kwargs.pop("on_open", None)

        def opened(peer: WSPeer) -> None:
            self._opened(peer)
            if user_hook is not None:
                user_hook(peer)

        peer = WSPeer("server", on_open=opened, **kwargs)
        self.peers.append(peer)
        return peer

    def _opened(self, peer: WSPeer) -> None:
        port = peer.transport.get_extra_info("peername")[1]
        fut = self._by_port.setdefault(port, peer.loop.create_future())
        if not fut.done():
            fut.set_result(peer)
        if self.handler is not None:
            task = peer.loop.create_task(self.handler(peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def accepted(self, peer_port: int, timeout: float = DEFAULT_TIMEOUT) -> WSPeer:
        """The opened peer of the connection coming from local port ``peer_port``."""
        fut = self._by_port.setdefault(peer_port, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut.done():
                self._by_port.pop(peer_port, None)

    async def __aenter__(self) -> WSServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        for p in self.peers:
            if p.transport is not None and not p.lost:
                p.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)


async def connect_peer(port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT,
                       **peer_kwargs) -> WSPeer:
    """A client ``WSPeer`` connected to ``host:port`` and opened (handshake done if asked)."""
    loop = asyncio.get_running_loop()
    _, peer = await asyncio.wait_for(
        loop.create_connection(lambda: WSPeer("client", **peer_kwargs), host, port), timeout)
    await asyncio.wait_for(peer.opened, timeout)
    return peer


# -- gateway-side stand-ins ------------------------------------------------------------------

class Holder(asyncio.Protocol):
    """Owns a transport until it is taken over; buffers whatever arrives (the tail)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lost = False
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read_until(self, sep: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Bytes up to and including ``sep`` (removed from the buffer)."""
        async with asyncio.timeout(timeout):
            while True:
                i = self.buffer.find(sep)
                if i >= 0:
                    head = bytes(self.buffer[: i + len(sep)])
                    del self.buffer[: i + len(sep)]
                    return head
                if self.lost:
                    raise PeerClosed(f"connection closed before {sep!r}")
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter

    def take_tail(self) -> bytes:
        tail = bytes(self.buffer)
        self.buffer.clear()
        return tail


class HolderServer:
    """Accepts connections into ``Holder``s; ``await accepted(peer_port)`` finds one."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.holders: list[Holder] = []
        self._by_port: dict[int, asyncio.Future] = {}

    def _factory(self) -> Holder:
        holder = _IndexedHolder(self)
        self.holders.append(holder)
        return holder

    async def accepted(self, peer_port: int, timeout: float = DEFAULT_TIMEOUT) -> Holder:
        fut = self._by_port.setdefault(peer_port, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if fut.done():
                self._by_port.pop(peer_port, None)

    async def __aenter__(self) -> HolderServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for h in self.holders:
            if h.transport is not None and not h.transport.is_closing():
                h.transport.abort()
        await self.server.wait_closed()


class _IndexedHolder(Holder):
    def __init__(self, server: HolderServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        port = transport.get_extra_info("peername")[1]
        fut = self._server._by_port.setdefault(port, asyncio.get_running_loop().create_future())
        if not fut.done():
            fut.set_result(self)


def _accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


async def accept_upgrade(holder: Holder, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Server side of a minimal upgrade: read the request head, answer 101; returns the
    tail (bytes after the head). Not a validating HTTP parser: a test aid only."""
    head = await holder.read_until(b"\r\n\r\n", timeout)
    key = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    if not key:
        raise ValueError(f"not a WebSocket upgrade request: {head[:200]!r}")
    holder.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + _accept_token(key)
                           + b"\r\n\r\n")
    return holder.take_tail()


async def request_upgrade(holder: Holder, host: str = "upstream.test", target: str = "/",
                          timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Client side of a minimal upgrade: send the request, check the 101 and its accept
    token; returns the tail (bytes after the 101 head)."""
    key = base64.b64encode(os.urandom(16))
    holder.transport.write(
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ".encode() + key + b"\r\n\r\n")
    head = await holder.read_until(b"\r\n\r\n", timeout)
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        raise ValueError(f"upgrade refused: {lines[0]!r}")
    accept = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            accept = value.strip()
    if accept != _accept_token(key):
        raise ValueError("bad Sec-WebSocket-Accept")
    return holder.take_tail()
