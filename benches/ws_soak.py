#!/usr/bin/env python3
"""Bounded chaos soak for the gateway's two WebSocket modes: after a burst of abusive
clients (and a misbehaving upstream and backend), does the gateway return to baseline?

What a run does:

1. Starts a **WebSocket upstream** (this file, `--serve-upstream PORT`, a child process so
   it can be SIGKILLed mid-stream). Its behaviour per connection comes from the query
   string the gateway forwards: `?mode=echo` (default), `flood` (sends 16 KiB messages
   as fast as the gateway takes them), `die` (echoes one message, then RST), `garbage`
   (101 then bytes that are no frame), `big` (a message over `max_message_bytes`),
   `close` (closes with 1000 after one echo), `hang` (never answers the upgrade),
   `noread` (101, then never reads).
2. Starts an in-process **HTTP backend** for the `websocket_apis` API `chat` on `/chat`:
   `$connect`, `$default` (echo, `return_response`) and `$disconnect`; each call is
   answered 200 at once, or (randomly) after longer than the route's timeout, or the
   TCP connection is reset without an answer.
3. Starts the **gateway** (`python -m edgeplane serve -c CONFIG`, one worker, admin on,
   `GET /ws` -> http integration to the upstream, `GET /ping` mock) with short
   timeouts (`websocket.idle_timeout` 3 s, `ping_interval`/`pong_timeout` 1 s,
   `limits.send_timeout`/`head_timeout` 2 s, pool `idle_timeout` 1 s) so every timeout
   path fires within the run.
4. Warm-up (a few clean echoes each mode), then the **baseline**: open fds of the gateway
   (`/proc/PID/fd`), VmRSS, `/stats` (`connections_open`, `websockets_open`,
   `websockets.open`, `websockets.apis.chat`) and `/upstreams` (`in_use`, `connecting`,
   `waiters`).
5. `--rounds` rounds; each runs `--clients` clients at once, each doing one random
   behaviour against `/ws` (proxy mode) or `/chat` (API mode): clean echo + close;
   abrupt close mid-frame (FIN or RST); garbage bytes; an unmasked frame; reserved bits;
   a reserved opcode; an oversized message (one frame or fragments); not reading while
   the upstream floods / the backend answers; the upgrade request and vanish (FIN/RST),
   or half a head; an upgrade with a body; requests pipelined before the upgrade; a
   ping flood; a message-rate flood; idle (answering pings -> idle timeout, or silent ->
   ping timeout); a close frame and then silence; and, proxy only, the upstream
   misbehaving (die, garbage, big, close, hang, noread). Every `--kill-every` rounds
   the upstream process is SIGKILLed mid-round and restarted on the same port.
6. **Settle** (polling, bounded by the longest configured timeout + the relay's 5 s
   close timeout + `--settle-extra`), then compare and print a table with PASS/FAIL:
   fds back to baseline (+-`--fd-slack`), `connections_open` 0, `websockets_open` 0,
   the API's open count 0, every upstream target's `in_use`/`connecting`/`waiters` 0,
   RSS growth <= `--rss-slack-mib`, a `$disconnect` call reached the backend for every
   connection the API opened, the gateway still serves one clean echo per mode, and the
   gateway's stderr has no `Traceback`, `Task exception was never retrieved` or
   `Exception in callback`. Exit status 1 on any FAIL.

Usage:

    .venv/bin/python benches/ws_soak.py                    # defaults: about 30-40 s
    .venv/bin/python benches/ws_soak.py --rounds 10 --clients 80 --seed 7
    .venv/bin/python benches/ws_soak.py --only proxy       # one mode only (proxy | api)
    .venv/bin/python benches/ws_soak.py --behaviours echo_clean,no_read --keep-workdir
    .venv/bin/python benches/ws_soak.py --serve-upstream 9000   # just the upstream

Every client has a deadline (`--client-timeout`), every wait is bounded, and every child
is stopped in `finally` (SIGTERM to its process group, then SIGKILL; PR_SET_PDEATHSIG if
this process dies).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from wsproto.connection import Connection, ConnectionState, ConnectionType  # noqa: E402
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage  # noqa: E402

from procs import Procs, free_port, wait_http  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 * 1024
BAD_LINES = ("Traceback", "Task exception was never retrieved", "Exception in callback")

# Gateway timeouts (seconds); the settle bound derives from them.
WS_IDLE, WS_PING, WS_PONG = 3.0, 1.0, 1.0
SEND_TIMEOUT, HEAD_TIMEOUT, KEEPALIVE = 2.0, 2.0, 3.0
ROUTE_TIMEOUT, CHAT_TIMEOUT, POOL_IDLE = 2.0, 1.0, 1.0
RELAY_CLOSE_TIMEOUT = 5.0 + 1.0  # wsrelay.RelaySettings.close_timeout + _FINAL_GRACE
API_CLOSE_WAIT = 2 * 2.0  # ws_connections.CLOSE_WAIT, twice (close, then drain)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def build_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
                rsv: int = 0, length: int | None = None) -> bytes:
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
        key = os.urandom(4)
        return bytes(head) + key + _mask(payload, key)
    return bytes(head) + payload


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


def _headers(head: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            out[name.strip().lower()] = value.strip()
    return out


# ============================================================================ upstream (child)

async def _up_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    flood: asyncio.Task | None = None
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode("latin-1")
        mode = "echo"
        m = re.search(r"[?&]mode=([a-z]+)", target)
        if m:
            mode = m.group(1)
        h = _headers(head)
        if b"sec-websocket-key" not in h:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            return
        if mode == "hang":
            await asyncio.sleep(30)
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(h[b"sec-websocket-key"]) + b"\r\n\r\n")
        if mode == "garbage":
            writer.write(b"\xff\xff\xff\xff garbage from upstream")
        await writer.drain()
        if mode == "noread":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await asyncio.sleep(30)
            return
        ws = Connection(ConnectionType.SERVER)
        if mode == "flood":
            async def pump() -> None:
                chunk = os.urandom(16 * 1024)
                while ws.state is ConnectionState.OPEN:
                    writer.write(ws.send(BytesMessage(data=chunk)))
                    await writer.drain()
            flood = asyncio.get_running_loop().create_task(pump())
        while True:
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, Message):
                    if ws.state is not ConnectionState.OPEN:
                        continue
                    if mode == "big":
                        writer.write(ws.send(BytesMessage(data=b"x" * (MAX_MESSAGE + 4096))))
                    else:
                        writer.write(ws.send(type(ev)(data=ev.data, message_finished=ev.message_finished)))
                    if ev.message_finished:
                        if mode == "die":
                            await writer.drain()
                            _rst(writer)
                            return
                        if mode == "close":
                            writer.write(ws.send(CloseConnection(code=1000, reason="bye")))
                elif isinstance(ev, Ping):
                    if ws.state is ConnectionState.OPEN:
                        writer.write(ws.send(ev.response()))
                elif isinstance(ev, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        writer.write(ws.send(ev.response()))
                    await writer.drain()
                    return
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    except Exception:  # noqa: BLE001 - wsproto errors from garbage: just drop the connection
        pass
    finally:
        if flood is not None:
            flood.cancel()
        writer.close()


async def serve_upstream(port: int) -> None:
    server = await asyncio.start_server(_up_conn, "127.0.0.1", port, backlog=1024, reuse_address=True)
    print(f"upstream listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


# ============================================================================ chat backend (in process)

class ChatBackend:
    def __init__(self, rng: random.Random, p_slow: float, p_abrupt: float) -> None:
        self.rng = rng
        self.p_slow = p_slow
        self.p_abrupt = p_abrupt
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.counts: collections.Counter = collections.Counter()
        self.disconnect_ids: collections.Counter = collections.Counter()
        self.message_ids: set[str] = set()
        self.chaos = True  # off: every call answered 200 at once (warm-up, liveness checks)
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                h = _headers(head)
                path = head.split(b" ", 2)[1].split(b"?")[0].decode("latin-1")
                body = await reader.readexactly(int(h.get(b"content-length", b"0")))
                self.counts[path] += 1
                cid = h.get(b"x-connection-id", b"").decode()
                if path == "/disconnect":
                    self.disconnect_ids[cid] += 1
                elif path == "/default":
                    self.message_ids.add(cid)
                r = self.rng.random() if self.chaos else 1.0
                if r < self.p_abrupt:
                    self.counts[path + ":abrupt"] += 1
                    _rst(writer)
                    return
                if r < self.p_abrupt + self.p_slow:
                    self.counts[path + ":slow"] += 1
                    await asyncio.sleep(CHAT_TIMEOUT + 0.5)
                out = body if path == "/default" else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\n\r\n" % len(out) + out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
                asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            self.tasks.discard(task)
            writer.close()


# ============================================================================ clients

class Outcomes:
    def __init__(self) -> None:
        self.c: collections.Counter = collections.Counter()

    def add(self, mode: str, behaviour: str, result: str) -> None:
        self.c[(mode, behaviour, result)] += 1


class Peer:
    """A client WebSocket (after the handshake) over asyncio streams, frames by wsproto."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tail: bytes) -> None:
        self.reader, self.writer = reader, writer
        self.ws = Connection(ConnectionType.CLIENT)
        if tail:
            self.ws.receive_data(tail)
        self.events: collections.deque = collections.deque()
        self.events.extend(self._events())

    def _events(self) -> list:
        try:
            return list(self.ws.events())
        except Exception:  # noqa: BLE001
            return [CloseConnection(code=1002, reason="client parse error")]

    def send(self, ev) -> None:
        if self.ws.state is ConnectionState.OPEN or isinstance(ev, CloseConnection):
            self.writer.write(self.ws.send(ev))

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_event(self, timeout: float, auto_pong: bool = True):
        """Next data message / close event; None at EOF. Pings answered if auto_pong."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self.events:
                ev = self.events.popleft()
                if isinstance(ev, Ping):
                    if auto_pong and self.ws.state is ConnectionState.OPEN:
                        self.writer.write(self.ws.send(ev.response()))
                    continue
                if isinstance(ev, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        self.writer.write(self.ws.send(ev.response()))
                    return ev
                if isinstance(ev, Message):
                    return ev
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                return None
            if self.ws.state is ConnectionState.CLOSED:
                continue
            self.ws.receive_data(data)
            self.events.extend(self._events())

    async def message(self, timeout: float):
        parts = []
        while True:
            ev = await self.next_event(timeout)
            if not isinstance(ev, Message):
                return ev
            parts.append(ev.data)
            if ev.message_finished:
                return ("" if isinstance(ev, TextMessage) else b"").join(parts)

    async def until_end(self, timeout: float, auto_pong: bool = True) -> str:
        """Read until the close frame and EOF; 'close:CODE', 'eof' or 'timeout'."""
        code = None
        try:
            while True:
                ev = await self.next_event(timeout, auto_pong)
                if ev is None:
                    return f"close:{code}" if code is not None else "eof"
                if isinstance(ev, CloseConnection):
                    code = int(ev.code)
        except TimeoutError:
            return f"close:{code}+no-eof" if code is not None else "timeout"
        except (ConnectionError, OSError):
            return f"close:{code}" if code is not None else "reset"


async def _connect(port: int, rcvbuf: int | None = None):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def upgrade_request(path: str, extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (f"GET {path} HTTP/1.1\r\nHost: soak.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ").encode() + key + b"\r\n" + extra + b"\r\n"


async def read_response(reader: asyncio.StreamReader, timeout: float = 8.0) -> tuple[int, bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    body = b""
    if status != 101:
        n = int(_headers(head).get(b"content-length", b"0"))
        body = await asyncio.wait_for(reader.readexactly(n), timeout)
    return status, head, body


async def open_ws(ctx: Soak, mode: str, query: str = "", *, prefix: bytes = b"", extra: bytes = b"",
                  rcvbuf: int | None = None, pipelined: int = 0):
    """(status, Peer or None, writer). The writer is closed by the caller (run_client)."""
    reader, writer = await _connect(ctx.gw_port, rcvbuf)
    ctx.track(writer)
    path = "/ws" + query if mode == "proxy" else "/chat"
    writer.write(prefix + upgrade_request(path, extra))
    for _ in range(pipelined):
        status, _, _ = await read_response(reader)
        if status != 200:
            return status, None, writer
    status, _, _ = await read_response(reader)
    if status != 101:
        return status, None, writer
    tail = bytes(reader._buffer)  # noqa: SLF001 - bytes after the 101 already read
    reader._buffer.clear()  # noqa: SLF001
    return 101, Peer(reader, writer, tail), writer


def _msg(mode: str, rng: random.Random) -> str:
    return json.dumps({"n": rng.randrange(10**9), "pad": "x" * rng.randrange(0, 2000)})


# --- behaviours: each returns an outcome label -----------------------------------------------

async def b_echo_clean(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    n = rng.randint(1, 10)
    for _ in range(n):
        text = _msg(mode, rng)
        p.send(TextMessage(data=text))
        got = await p.message(5)
        if mode == "proxy" and got != text:
            return f"echo-mismatch:{type(got).__name__}"
        if mode == "api" and not isinstance(got, (str, bytes)):
            return f"no-answer:{getattr(got, 'code', got)}"
    p.send(CloseConnection(code=1000, reason="done"))
    return "ok:" + await p.until_end(8)


async def b_abort_mid_message(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    p.send(TextMessage(data="before"))
    p.raw(build_frame(OP_BINARY, os.urandom(100), length=5000))  # declares 5000, sends 100
    await asyncio.sleep(rng.random() * 0.2)
    if rng.random() < 0.5:
        _rst(w)
        return "rst"
    w.close()
    return "fin"


async def _bad_then_end(ctx, mode, data: bytes, query="?mode=echo"):
    status, p, w = await open_ws(ctx, mode, query)
    if p is None:
        return f"status:{status}"
    p.raw(data)
    return await p.until_end(8)


async def b_garbage(ctx, mode, rng):
    return await _bad_then_end(ctx, mode, os.urandom(rng.randint(2, 3000)))


async def b_unmasked(ctx, mode, rng):
    return await _bad_then_end(ctx, mode, build_frame(OP_TEXT, b"unmasked", mask=False))


async def b_reserved_bits(ctx, mode, rng):
    return await _bad_then_end(ctx, mode, build_frame(OP_TEXT, b"rsv", rsv=rng.randint(1, 7)))


async def b_bad_opcode(ctx, mode, rng):
    return await _bad_then_end(ctx, mode, build_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), b"op"))


async def b_bad_control(ctx, mode, rng):
    choice = rng.randrange(3)
    if choice == 0:
        frame = build_frame(OP_PING, b"p" * 200)  # control frame > 125
    elif choice == 1:
        frame = build_frame(OP_PING, b"p", fin=False)  # fragmented control frame
    else:
        frame = build_frame(OP_CONT, b"orphan")  # continuation without a start
    return await _bad_then_end(ctx, mode, frame)


async def b_bad_utf8(ctx, mode, rng):
    return await _bad_then_end(ctx, mode, build_frame(OP_TEXT, b"\xc3\x28\xff"))


async def b_oversized(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    data = os.urandom(MAX_MESSAGE + rng.randint(1, 50000))
    if rng.random() < 0.5:
        p.send(BytesMessage(data=data))
    else:
        step = 8192
        for i in range(0, len(data), step):
            p.send(BytesMessage(data=data[i:i + step], message_finished=i + step >= len(data)))
    return await p.until_end(8)


async def b_no_read(ctx, mode, rng):
    """Stop reading while the other side produces: the gateway must cut us off."""
    status, p, w = await open_ws(ctx, mode, "?mode=flood", rcvbuf=4096)
    if p is None:
        return f"status:{status}"
    if mode == "api":  # make the backend answer a lot (return_response)
        for _ in range(60):
            p.send(TextMessage(data="y" * 60000))
    t0 = time.monotonic()
    await asyncio.sleep(SEND_TIMEOUT + WS_PING + WS_PONG + 3)
    # now read: we should find the connection cut (EOF/reset) after the buffered bytes
    w.transport.resume_reading()
    try:
        while True:
            data = await asyncio.wait_for(p.reader.read(1 << 20), 5)
            if not data:
                return f"cut({time.monotonic() - t0:.0f}s)"
    except TimeoutError:
        return "still-open"
    except (ConnectionError, OSError):
        return "reset"


async def b_half_open(ctx, mode, rng):
    reader, writer = await _connect(ctx.gw_port)
    ctx.track(writer)
    req = upgrade_request("/ws?mode=echo" if mode == "proxy" else "/chat")
    kind = rng.randrange(3)
    if kind == 2:  # half a head, then silence: head_timeout
        writer.write(req[: len(req) // 2])
        try:
            data = await asyncio.wait_for(reader.read(65536), HEAD_TIMEOUT + 5)
            return "partial:" + (data.split(b" ", 2)[1].decode() if data else "eof")
        except TimeoutError:
            return "partial:no-timeout"
        except (ConnectionError, OSError):
            return "partial:reset"
    writer.write(req)
    await asyncio.sleep(rng.random() * 0.05)
    if kind == 0:
        writer.close()
        return "vanish-fin"
    _rst(writer)
    return "vanish-rst"


async def b_upgrade_with_body(ctx, mode, rng):
    reader, writer = await _connect(ctx.gw_port)
    ctx.track(writer)
    body = b"x" * rng.randint(1, 100)
    if rng.random() < 0.5:
        extra = b"Content-Length: %d\r\n" % len(body)
    else:
        extra, body = b"Transfer-Encoding: chunked\r\n", b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    writer.write(upgrade_request("/ws?mode=echo" if mode == "proxy" else "/chat", extra) + body)
    status, _, _ = await read_response(reader)
    return f"status:{status}"


async def b_pipelined(ctx, mode, rng):
    n = rng.randint(1, 3)
    prefix = b"GET /ping HTTP/1.1\r\nHost: soak.test\r\n\r\n" * n
    status, p, w = await open_ws(ctx, mode, "?mode=echo", prefix=prefix, pipelined=n)
    if p is None:
        return f"status:{status}"
    p.send(TextMessage(data="after-pipeline"))
    got = await p.message(5)
    p.send(CloseConnection(code=1000))
    end = await p.until_end(8)
    return ("ok:" if isinstance(got, str) else "bad:") + end


async def b_ping_flood(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    frames = b"".join(build_frame(OP_PING, os.urandom(100)) for _ in range(rng.randint(500, 3000)))
    p.raw(frames)
    await asyncio.sleep(0.2)
    p.send(CloseConnection(code=1000))
    return await p.until_end(8)


async def b_rate_flood(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    p.raw(b"".join(build_frame(OP_TEXT, b"r") for _ in range(400)))
    if mode == "api":
        p.send(CloseConnection(code=1000))
    return await p.until_end(10)


async def b_idle_pong(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    return await p.until_end(WS_IDLE + RELAY_CLOSE_TIMEOUT + 3, auto_pong=True)


async def b_idle_silent(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    return await p.until_end(WS_IDLE + RELAY_CLOSE_TIMEOUT + 3, auto_pong=False)


async def b_close_then_silence(ctx, mode, rng):
    status, p, w = await open_ws(ctx, mode, "?mode=echo")
    if p is None:
        return f"status:{status}"
    p.send(CloseConnection(code=1000, reason="bye"))
    # never read: the gateway must close TCP itself; wait for EOF without reading frames
    await asyncio.sleep(RELAY_CLOSE_TIMEOUT + 1)
    try:
        while await asyncio.wait_for(p.reader.read(65536), 3):
            pass
        return "eof"
    except TimeoutError:
        return "still-open"
    except (ConnectionError, OSError):
        return "reset"


async def _upstream_mode(ctx, mode, rng, umode: str):
    status, p, w = await open_ws(ctx, mode, f"?mode={umode}")
    if p is None:
        return f"status:{status}"
    if umode == "noread":
        for _ in range(150):
            p.send(BytesMessage(data=b"z" * 60000))
    else:
        p.send(TextMessage(data="trigger"))
    return await p.until_end(SEND_TIMEOUT + RELAY_CLOSE_TIMEOUT + 5)


async def b_up_die(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "die")


async def b_up_garbage(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "garbage")


async def b_up_big(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "big")


async def b_up_close(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "close")


async def b_up_hang(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "hang")


async def b_up_noread(ctx, mode, rng):
    return await _upstream_mode(ctx, mode, rng, "noread")


BEHAVIOURS = {
    "echo_clean": (b_echo_clean, 4), "abort_mid_message": (b_abort_mid_message, 2),
    "garbage": (b_garbage, 1), "unmasked": (b_unmasked, 1), "reserved_bits": (b_reserved_bits, 1),
    "bad_opcode": (b_bad_opcode, 1), "bad_control": (b_bad_control, 1), "bad_utf8": (b_bad_utf8, 1),
    "oversized": (b_oversized, 1), "no_read": (b_no_read, 1), "half_open": (b_half_open, 2),
    "upgrade_with_body": (b_upgrade_with_body, 1), "pipelined": (b_pipelined, 1),
    "ping_flood": (b_ping_flood, 1), "rate_flood": (b_rate_flood, 1), "idle_pong": (b_idle_pong, 1),
    "idle_silent": (b_idle_silent, 1), "close_then_silence": (b_close_then_silence, 1),
}
PROXY_ONLY = {
    "up_die": (b_up_die, 1), "up_garbage": (b_up_garbage, 1), "up_big": (b_up_big, 1),
    "up_close": (b_up_close, 1), "up_hang": (b_up_hang, 1), "up_noread": (b_up_noread, 1),
}


# ============================================================================ the soak

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def get_json(port: int, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.rng = random.Random(args.seed)
        self.outcomes = Outcomes()
        self.writers: list[asyncio.StreamWriter] = []
        self.up_port = free_port()
        self.gw_port = 0
        self.admin_port = 0
        self.gw: subprocess.Popen | None = None
        self.up: subprocess.Popen | None = None
        self.backend = ChatBackend(random.Random(args.seed + 1), args.p_slow, args.p_abrupt)
        self.kills = 0

    def track(self, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)

    # -- processes ---------------------------------------------------------------------------
    def start_upstream(self) -> None:
        name = f"upstream-{self.kills}"
        self.up = self.procs.start(name, [sys.executable, str(Path(__file__).resolve()),
                                          "--serve-upstream", str(self.up_port)], None)
        wait_http(self.up_port, "/", self.up, timeout=15)

    def config(self) -> dict:
        a = self.args
        pool = {"idle_timeout": f"{POOL_IDLE}s", "max_idle": a.pool_max_idle}
        chat_route = lambda path: {"integration": {"type": "http", "upstream": "chat", "path": path,  # noqa: E731
                                                   "timeout": f"{CHAT_TIMEOUT}s"}}
        return {
            "listen": [f"127.0.0.1:{self.gw_port}"], "workers": 1,
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "insecure": True},
            "access_log": {"destination": "file", "path": str(self.workdir / "access.log")},
            "log_level": "info", "drain_timeout": "2s",
            "upstreams": {
                "echo": {"targets": [f"http://127.0.0.1:{self.up_port}"], "pool": pool},
                "chat": {"targets": [f"http://127.0.0.1:{self.backend.port}"], "pool": pool},
            },
            "limits": {"send_timeout": f"{SEND_TIMEOUT}s", "head_timeout": f"{HEAD_TIMEOUT}s",
                       "keepalive_timeout": f"{KEEPALIVE}s", "body_timeout": "2s"},
            "websocket": {"idle_timeout": f"{WS_IDLE}s", "ping_interval": f"{WS_PING}s",
                          "pong_timeout": f"{WS_PONG}s", "max_message_bytes": MAX_MESSAGE,
                          "messages_per_second": 100, "message_burst": 200,
                          "connections_per_second": a.connections_per_second},
            "routes": [
                {"route": "GET /ws", "integration": {"type": "http", "upstream": "echo",
                                                     "timeout": f"{ROUTE_TIMEOUT}s"}},
                {"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}},
            ],
            "websocket_apis": {"chat": {"path": "/chat", "routes": {
                "$connect": chat_route("/connect"), "$disconnect": chat_route("/disconnect"),
                "$default": dict(chat_route("/default"), return_response=True),
            }}},
        }

    def start_gateway(self) -> None:
        self.gw_port, self.admin_port = free_port(), free_port()
        path = self.workdir / "gateway.yaml"
        path.write_text(json.dumps(self.config(), indent=2) + "\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.gw = self.procs.start("gateway", [sys.executable, "-m", "edgeplane", "serve", "-c", str(path)],
                                   None, env=env)
        try:
            wait_http(self.admin_port, "/healthz", self.gw, timeout=20)
            wait_http(self.gw_port, "/ping", self.gw, timeout=5)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway did not start: {exc}\n{self.procs.log_tail('gateway')}") from None

    def kill_upstream(self) -> None:
        if self.up is not None and self.up.poll() is None:
            os.killpg(self.up.pid, signal.SIGKILL)
            self.up.wait(5)
        self.kills += 1

    # -- readings ------------------------------------------------------------------------------
    def reading(self) -> dict:
        pid = self.gw.pid
        fds = fd_count(pid)
        r = rss(pid)
        stats = get_json(self.admin_port, "/stats")
        ups = get_json(self.admin_port, "/upstreams")
        pool = {"in_use": 0, "connecting": 0, "waiters": 0, "idle": 0}
        per: dict = {}
        for u in ups["upstreams"]:
            for t in u["targets"]:
                for k in pool:
                    pool[k] += t[k]
                    per.setdefault(k, []).append(f"{u['name']}:{t[k]}")
        ws = stats.get("websockets", {})
        return {"fds": fds, "rss": r, "connections_open": stats["connections_open"],
                "websockets_open": stats["websockets_open"], "api_open": ws.get("open", 0),
                "api_chat_open": ws.get("apis", {}).get("chat", 0), "api_opened": ws.get("opened", 0),
                **{f"pool_{k}": v for k, v in pool.items()},
                **{f"pool_{k}_per": " ".join(v) for k, v in per.items()}, "stats": stats, "upstreams": ups}

    # -- clients -------------------------------------------------------------------------------
    def pick(self) -> tuple[str, str]:
        a = self.args
        mode = self.rng.choice(a.modes)
        table = dict(BEHAVIOURS)
        if mode == "proxy":
            table.update(PROXY_ONLY)
        if a.behaviours:
            table = {k: v for k, v in table.items() if k in a.behaviours} or {"echo_clean": BEHAVIOURS["echo_clean"]}
        names = list(table)
        return mode, self.rng.choices(names, weights=[table[n][1] for n in names])[0]

    async def run_client(self, mode: str, name: str) -> None:
        fn = (BEHAVIOURS.get(name) or PROXY_ONLY[name])[0]
        rng = random.Random(self.rng.random())
        try:
            result = await asyncio.wait_for(fn(self, mode, rng), self.args.client_timeout)
        except TimeoutError:
            result = "client-timeout"
        except (ConnectionError, OSError) as exc:
            result = f"error:{type(exc).__name__}"
        except asyncio.IncompleteReadError:
            result = "error:incomplete-response"
        except Exception as exc:  # noqa: BLE001
            result = f"error:{type(exc).__name__}:{exc}"[:80]
        self.outcomes.add(mode, name, result)

    def close_writers(self) -> None:
        for w in self.writers:
            if not w.transport.is_closing():
                w.close()
        self.writers.clear()

    async def one_round(self, index: int) -> None:
        a = self.args
        tasks = []
        for _ in range(a.clients):
            mode, name = self.pick()
            tasks.append(asyncio.ensure_future(self.run_client(mode, name)))
            await asyncio.sleep(self.rng.random() * 0.01)
        if a.kill_every and (index + 1) % a.kill_every == 0:
            await asyncio.sleep(0.3 + self.rng.random() * 0.7)
            self.kill_upstream()
            await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, self.start_upstream)
        await asyncio.wait(tasks, timeout=a.client_timeout + 5)
        self.close_writers()

    async def live_echo(self, mode: str) -> str:
        try:
            status, p, w = await open_ws(self, mode, "?mode=echo")
            if p is None:
                return f"status:{status}"
            p.send(TextMessage(data="alive"))
            got = await p.message(5)
            p.send(CloseConnection(code=1000))
            end = await p.until_end(5)
            w.close()
            if mode == "proxy" and got != "alive":
                return f"bad echo {got!r}"
            if mode == "api" and got != "alive":
                return f"answer {got!r}"
            return "ok" if end.startswith("close:1000") else f"ok, end {end}"
        except Exception as exc:  # noqa: BLE001
            return f"error {exc!r}"

    async def main(self) -> int:
        a = self.args
        await self.backend.start()
        self.start_upstream()
        self.start_gateway()
        t_start = time.monotonic()
        # warm-up: pay first-use allocations before the baseline
        self.backend.chaos = False
        for _ in range(3):
            for mode in a.modes:
                await self.live_echo(mode)
        self.close_writers()
        self.backend.chaos = True
        await asyncio.sleep(POOL_IDLE + 1.5)
        base = self.reading()
        base_disc = sum(self.backend.disconnect_ids.values())
        print(f"gateway pid {self.gw.pid}; baseline fds {base['fds']}, rss {base['rss'] / 2**20:.1f} MiB", flush=True)
        for i in range(a.rounds):
            t0 = time.monotonic()
            await self.one_round(i)
            print(f"round {i + 1}/{a.rounds}: {a.clients} clients in {time.monotonic() - t0:.1f}s", flush=True)
        # settle
        bound = max(WS_IDLE, SEND_TIMEOUT, WS_PING + WS_PONG, HEAD_TIMEOUT, KEEPALIVE, ROUTE_TIMEOUT,
                    CHAT_TIMEOUT + 0.5, POOL_IDLE) + RELAY_CLOSE_TIMEOUT + a.settle_extra
        t0 = time.monotonic()
        while True:
            after = self.reading()
            settled = (after["fds"] <= base["fds"] + a.fd_slack and after["connections_open"] == 0
                       and after["websockets_open"] == 0 and after["api_open"] == 0
                       and after["pool_idle"] == 0
                       and all(int(x.rsplit(":", 1)[1]) == 0 for x in after["pool_in_use_per"].split()))
            if settled or time.monotonic() - t0 > bound:
                break
            await asyncio.sleep(0.5)
        settle_s = time.monotonic() - t0
        self.backend.chaos = False
        lives = {mode: await self.live_echo(mode) for mode in a.modes}
        self.close_writers()
        await asyncio.sleep(0.5)
        final = self.reading()
        err = (self.workdir / "gateway.log").read_text(errors="replace")
        bad = [ln for ln in err.splitlines() if any(b in ln for b in BAD_LINES)]
        opened = final["api_opened"] - base["api_opened"]
        disc = sum(self.backend.disconnect_ids.values()) - base_disc
        dup = sum(1 for v in self.backend.disconnect_ids.values() if v > 1)
        missing = len(self.backend.message_ids - set(self.backend.disconnect_ids))

        rows = []

        def check(name, before, value, limit, ok):
            rows.append((name, str(before), str(value), limit, "PASS" if ok else "FAIL"))

        check("open fds", base["fds"], after["fds"], f"<= {base['fds'] + a.fd_slack}",
              after["fds"] <= base["fds"] + a.fd_slack)
        growth = (after["rss"] - base["rss"]) / 2**20
        check("RSS MiB", f"{base['rss'] / 2**20:.1f}", f"{after['rss'] / 2**20:.1f} ({growth:+.1f})",
              f"growth <= {a.rss_slack_mib}", growth <= a.rss_slack_mib)
        for key in ("connections_open", "websockets_open", "api_open", "api_chat_open"):
            check(key, base[key], after[key], "0", after[key] == 0)
        for key in ("in_use", "connecting", "waiters", "idle"):
            k = "pool_" + key
            check(f"upstreams {key}", base[k + "_per"], after[k + "_per"],
                  "0 each" + (" (pool idle_timeout 1s)" if key == "idle" else ""),
                  all(int(x.rsplit(":", 1)[1]) == 0 for x in after[k + "_per"].split()))
        check("$disconnect per API conn", "-", f"{disc} calls / {opened} opened, {dup} dup, {missing} unseen",
              "calls == opened", disc == opened and dup == 0 and missing == 0)
        warn = [ln for ln in err.splitlines() if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln]
        rows.append(("log WARNING/ERROR (info)", "-", str(len(warn)), "-", "info"))
        for mode, res in lives.items():
            check(f"still serves ({mode})", "-", res, "ok", res == "ok")
        check("stderr clean", "-", f"{len(bad)} bad lines", "0", not bad)

        self.print_outcomes()
        print(f"\nbackend calls: {dict(sorted(self.backend.counts.items()))}")
        print(f"upstream kills: {self.kills}; settle: {settle_s:.1f}s (bound {bound:.0f}s); "
              f"total {time.monotonic() - t_start:.1f}s; seed {a.seed}")
        w = [max(len(r[i]) for r in rows + [("check", "before", "after", "limit", "result")]) for i in range(5)]
        print()
        for r in [("check", "before", "after", "limit", "result")] + rows:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
        if bad:
            print("\ngateway stderr, offending lines (first 10):")
            for ln in bad[:10]:
                print("  " + ln)
            print(f"  (full log: {self.workdir / 'gateway.log'})")
        if after["connections_open"] or after["websockets_open"] or after["pool_in_use_per"].count(":0") != 2:
            print("\n/upstreams connections in use:")
            busy = 0
            for u in after["upstreams"]["upstreams"]:
                for t in u["targets"]:
                    print(f"  {u['name']}: in_use {t['in_use']}, closed {t['closed']}")
                    for c in t["connections"]:
                        if c.get("state") != "idle":
                            busy += 1
                            print(f"    {c}")
            if not busy:
                print("  (no busy connection listed: a non-zero in_use is a counting error, not a held socket)")
        if a.json:
            Path(a.json).write_text(json.dumps({"baseline": base, "after": after, "rows": rows,
                                                "outcomes": [list(k) + [v] for k, v in self.outcomes.c.items()]},
                                               indent=1, default=str))
        if warn:
            print("\ngateway WARNING/ERROR lines (first 10):")
            for ln in warn[:10]:
                print("  " + ln)
        failed = [r for r in rows if r[4] == "FAIL"]
        print(f"\n{'FAIL' if failed else 'PASS'}: {len(rows) - len(failed)}/{len(rows)} checks passed")
        return 1 if failed else 0

    async def run(self) -> int:
        try:
            return await self.main()
        finally:
            self.close_writers()
            await self.backend.stop()

    def print_outcomes(self) -> None:
        print("\nclient outcomes (mode, behaviour: result x count):")
        by: dict = collections.defaultdict(list)
        for (mode, name, result), n in sorted(self.outcomes.c.items()):
            by[(mode, name)].append(f"{result} x{n}")
        for (mode, name), items in sorted(by.items()):
            print(f"  {mode:5} {name:20} {', '.join(items)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is checked.")
    p.add_argument("--rounds", type=int, default=3, help="rounds of chaos (default 3)")
    p.add_argument("--clients", type=int, default=40, help="concurrent clients per round (default 40)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--only", choices=["proxy", "api"], help="one WebSocket mode only")
    p.add_argument("--behaviours", help="comma-separated subset of behaviours: " +
                   ",".join(list(BEHAVIOURS) + list(PROXY_ONLY)))
    p.add_argument("--kill-every", type=int, default=2,
                   help="SIGKILL + restart the upstream in every Nth round (0: never; default 2)")
    p.add_argument("--p-slow", type=float, default=0.1, help="backend: share of slow answers (default 0.1)")
    p.add_argument("--p-abrupt", type=float, default=0.05, help="backend: share of resets (default 0.05)")
    p.add_argument("--connections-per-second", type=float, default=2000,
                   help="websocket.connections_per_second (default 2000)")
    p.add_argument("--pool-max-idle", type=int, default=128,
                   help="upstreams' pool.max_idle (default 128, the gateway's default; an idle "
                        "pool that overflows exercises the 'idle_pool_full' close path)")
    p.add_argument("--client-timeout", type=float, default=20.0, help="per-client deadline (default 20 s)")
    p.add_argument("--fd-slack", type=int, default=3, help="allowed fd growth (default 3)")
    p.add_argument("--rss-slack-mib", type=float, default=16.0, help="allowed RSS growth (default 16)")
    p.add_argument("--settle-extra", type=float, default=4.0, help="settle margin (default 4 s)")
    p.add_argument("--json", metavar="FILE", help="write readings and outcomes as JSON")
    p.add_argument("--keep-workdir", action="store_true", help="keep the config and logs")
    p.add_argument("--serve-upstream", metavar="PORT", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    a.modes = [a.only] if a.only else ["proxy", "api"]
    a.behaviours = set(a.behaviours.split(",")) if a.behaviours else None
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        try:
            import uvloop
            uvloop.run(serve_upstream(args.serve_upstream))
        except ImportError:
            asyncio.run(serve_upstream(args.serve_upstream))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="ws-soak-"))
    soak = Soak(args, workdir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return asyncio.run(soak.run())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        soak.procs.close()
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
