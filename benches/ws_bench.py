#!/usr/bin/env python3
"""WebSocket proxying cost (its budget): echo throughput direct vs through the
gateway, and the gateway's memory per idle proxied WebSocket.

Budget rows checked:

- memory per idle WebSocket connection through the gateway: at most 20 KiB;
- proxied echo throughput (messages/s): at least 0.5x of the same load sent directly to
  the upstream.

What a run does (every child in its own process group, pinned like benches/run.py):

1. **Echo throughput.** A WebSocket echo upstream (this file, `--serve-echo PORT`: uvloop,
   an `asyncio.Protocol` per connection, wsproto for the frames, each whole message sent
   back as one frame) and the gateway (`python -m edgeplane serve -c CONFIG`, one worker,
   access log off, `GET /ws` -> `http` integration to the echo upstream). A load generator
   process (this file, `--loadgen PORT`) opens C WebSockets and runs a closed loop: each
   connection sends one S-byte message (text by default), waits for its echo, and sends
   the next, for a warm-up and then D measured seconds. It reports messages/s and the
   p50/p99 round trip. The same load runs once against the upstream directly and once
   through the gateway; the ratio proxied/direct is the budget figure. CPU-seconds of the
   gateway, the upstream and the load generator are read from /proc (benches/procs.py)
   at the start and the end of the measured window, which the load generator announces
   on its stdout; the gateway's CPU per message is its CPU-seconds / messages echoed.
2. **Idle memory.** A fresh upstream and a fresh gateway. This process opens N WebSockets
   (in batches, each with a timeout) that each do one echo and then stay idle: first
   directly to the upstream (the upstream's VmRSS before/after: its cost per connection,
   for comparison), then through the gateway (the gateway's VmRSS, summed over its process
   tree as benches/idle_conns.py does). 50 connections are opened and kept before the
   "before" reading, to pay first-use allocations. The pool's `max_connections` is set
   above N, and the descriptor limit of this process is raised before any child starts
   (children inherit it).
3. **The relay alone.** In this process, `wsrelay.start_relay` over two transports that
   do no I/O: one client frame in and one upstream frame back, timed (best of 3 runs of
   `--micro-rounds`), next to the bare wsproto calls the relay makes for the same frames.
   Set against the gateway's CPU per message from step 1, this splits the gateway's cost
   into wsproto, the relay's own code, and the rest (event loop, syscalls, kernel TCP).

Output: a table per part, the budget rows (met / NOT met) and, with `--json FILE`, every
figure (per-process CPU user/system split, per-core busy time from /proc/stat, the
gateway's /upstreams telemetry). "other CPU" is the machine's busy time not charged to
the gateway, the upstream or the load generator during a measured window; above 0.1
CPU-s/s the run was disturbed by something else and a warning is printed.

Pinning (2+ cores, `benches/procs.cpu_plan(1)`): the gateway on the first core; the echo
upstream and the load generator share the other core(s). So the *direct* run is bound by
the load core (upstream + load generator), and the *proxied* run by whichever of the
gateway core and the load core saturates first: the table shows each process's CPU
utilisation to tell which. `--no-pin` turns pinning off: the direct run can then use
both cores for the upstream and the load generator, while the proxied run shares them
with the gateway, which makes the ratio much less flattering.

    .venv/bin/python benches/ws_bench.py                       # defaults: about 25 s
    .venv/bin/python benches/ws_bench.py -c 64 -s 64 -d 5 --idle-connections 2000 --json out.json
    .venv/bin/python benches/ws_bench.py --skip-idle -s 4096 --binary
    .venv/bin/python benches/ws_bench.py --skip-idle --profile-gateway /tmp/gw.prof   # cProfile
    .venv/bin/python benches/ws_bench.py --serve-echo 9000     # just the echo upstream
    .venv/bin/python benches/ws_bench.py --loadgen 9000 -c 8 -d 3   # just the load generator

`--profile-gateway FILE` runs the throughput gateway under cProfile (`python -m cProfile
-o FILE -m edgeplane serve ...`), prints its top functions by own time and keeps FILE.
The profile covers the gateway's whole life (it idles through the direct run, which shows
up as time in `asyncio.runners.run`, uvloop's C loop); the figures of such a run are
inflated by the profiler and not comparable.

Bounded: every connect, handshake and echo has a timeout, the load generator is waited
for at most warm-up + duration + 60 s, and every process started is stopped in `finally`
(SIGTERM to its group, then SIGKILL; PR_SET_PDEATHSIG if this process is killed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import CLK_TCK, Procs, cpu_plan, descendants, free_port, rss_bytes, wait_http  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover - the project depends on uvloop
    uvloop = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BUDGET_IDLE_KIB = 20.0
BUDGET_RATIO = 0.5
WARM_CONNECTIONS = 50
BATCH = 500
TIMEOUT = 10.0  # connect / handshake / first echo, per connection
OTHER_CPU_WARN = 0.1  # CPU-s/s used by other processes in a measured window: disturbed
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _run(coro):
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# =========================================================================== echo upstream

class EchoProtocol(asyncio.Protocol):
    """One upstream connection: the HTTP upgrade by hand, then wsproto frames; every whole
    message goes back as one frame of the same type; pings answered; close echoed."""

    __slots__ = ("transport", "buf", "ws", "parts")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ws = None
        self.parts: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 16384:
                    self.transport.close()
                return
            head, rest = bytes(self.buf[:end]), bytes(self.buf[end + 4:])
            self.buf = bytearray()
            key = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if key is None:  # a plain HTTP probe
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                self.transport.close()
                return
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key)
                                 + b"\r\n\r\n")
            from wsproto.connection import Connection, ConnectionType
            self.ws = ws = Connection(ConnectionType.SERVER)
            if not rest:
                return
            data = rest
        ws.receive_data(data)
        self.pump()

    def pump(self) -> None:
        from wsproto.connection import ConnectionState
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
        ws = self.ws
        out = []
        for ev in ws.events():
            t = type(ev)
            if t is TextMessage or t is BytesMessage:
                if not ev.message_finished or self.parts:
                    self.parts.append(ev.data)
                    if not ev.message_finished:
                        continue
                    data = ("" if t is TextMessage else b"").join(self.parts)
                    self.parts = []
                    ev = t(data=data)
                out.append(ws.send(ev))
            elif t is Ping:
                out.append(ws.send(ev.response()))
            elif t is CloseConnection:
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    out.append(ws.send(ev.response()))
                if out:
                    self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.ws = None


async def serve_echo(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ws echo upstream on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


# =========================================================================== client side

def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One masked, final frame (the client side of RFC 6455)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n <= 125:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + key + _mask(payload, key)


class ClientStats:
    __slots__ = ("running", "measuring", "count", "lat", "errors", "first_error")

    def __init__(self) -> None:
        self.running = True
        self.measuring = False
        self.count = 0
        self.lat: list[float] = []
        self.errors = 0
        self.first_error: str | None = None

    def error(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what


class WsClient(asyncio.Protocol):
    """A WebSocket client with one message in flight at a time. The frame it sends is
    masked once per connection and reused (the server cannot tell); the echo is checked
    byte for byte. `loop_echo`: send the next message as soon as the echo arrives."""

    def __init__(self, stats: ClientStats, path: str, payload: bytes, opcode: int,
                 loop_echo: bool) -> None:
        loop = asyncio.get_running_loop()
        self.stats = stats
        self.path = path
        self.payload = payload
        self.opcode = opcode
        self.loop_echo = loop_echo
        self.key = base64.b64encode(os.urandom(16))
        mkey = os.urandom(4)
        self.frame = client_frame(opcode, payload, mkey)
        self.mkey = mkey
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.opened = loop.create_future()
        self.echoed = loop.create_future()
        self.lost = loop.create_future()
        self.sent_at = 0.0
        self.parts: list[bytes] = []
        self.part_op = 0
        self.close_sent = False
        self.echoes = 0

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ".encode()
            + self.key + b"\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail("response head too large")
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            lines = head.split(b"\r\n")
            if not lines[0].startswith(b"HTTP/1.1 101"):
                self._fail(f"handshake answered {lines[0][:60].decode(errors='replace')!r}")
                return
            accept = b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-accept":
                    accept = value.strip()
            if accept != accept_key(self.key):
                self._fail("bad Sec-WebSocket-Accept")
                return
            self.upgraded = True
            self.opened.set_result(None)
        self._frames()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost during the handshake ({exc!r})"))
        if not self.echoed.done():
            self.echoed.set_exception(ConnectionError(f"connection lost before the echo ({exc!r})"))
        if not self.close_sent and self.stats.running:
            self.stats.error(f"connection lost while running ({exc!r})")
        if not self.lost.done():
            self.lost.set_result(None)

    # -- frames
    def _frames(self) -> None:
        buf = self.buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            p = pos + 2
            if n == 126:
                if size - p < 2:
                    break
                n = int.from_bytes(buf[p:p + 2], "big")
                p += 2
            elif n == 127:
                if size - p < 8:
                    break
                n = int.from_bytes(buf[p:p + 8], "big")
                p += 8
            if b1 & 0x80:
                self._fail("masked frame from the server")
                return
            if size - p < n:
                break
            payload = bytes(buf[p:p + n])
            pos = p + n
            op = b0 & 0x0F
            if op == OP_TEXT or op == OP_BINARY or op == OP_CONT:
                if op != OP_CONT:
                    self.part_op = op
                if not b0 & 0x80:
                    self.parts.append(payload)
                    continue
                if self.parts:
                    self.parts.append(payload)
                    payload = b"".join(self.parts)
                    self.parts = []
                self._message(self.part_op, payload)
            elif op == OP_PING:
                self.transport.write(client_frame(OP_PONG, payload, self.mkey))
            elif op == OP_CLOSE:
                if not self.close_sent:  # the server started it: reply, then wait for EOF
                    self.close_sent = True
                    if self.stats.running:
                        self.stats.error(f"server closed the WebSocket: {payload[:2].hex()} {payload[2:60]!r}")
                    self.transport.write(client_frame(OP_CLOSE, payload[:2], self.mkey))
        if pos:
            del buf[:pos]

    def _message(self, op: int, payload: bytes) -> None:
        now = time.perf_counter()
        stats = self.stats
        if op != self.opcode or payload != self.payload:
            stats.error(f"echo mismatch: opcode {op}, {len(payload)} bytes")
        self.echoes += 1
        if stats.measuring:
            stats.count += 1
            stats.lat.append(now - self.sent_at)
        if not self.echoed.done():
            self.echoed.set_result(None)
        if self.loop_echo and stats.running and not self.close_sent:
            self.send()

    def send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.upgraded and not self.close_sent:
            self.close_sent = True
            self.transport.write(client_frame(OP_CLOSE, struct.pack("!H", 1000), self.mkey))
        else:
            self.close_sent = True
            self.transport.close()

    def _fail(self, why: str) -> None:
        self.stats.error(why)
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.abort()


async def open_clients(port: int, path: str, n: int, stats: ClientStats, payload: bytes,
                       opcode: int, loop_echo: bool, echo_once: bool,
                       out: list[WsClient] | None = None) -> list[WsClient]:
    """Opens `n` WebSockets in batches of BATCH (each handshake within TIMEOUT). With
    `echo_once`, each does one echo (within TIMEOUT) before the next batch.
    Clients are appended to `out` as they open, so a caller's `finally` can close them."""
    loop = asyncio.get_running_loop()
    clients = out if out is not None else []

    async def one() -> None:
        _, cl = await asyncio.wait_for(loop.create_connection(
            lambda: WsClient(stats, path, payload, opcode, loop_echo), "127.0.0.1", port), TIMEOUT)
        clients.append(cl)
        await asyncio.wait_for(asyncio.shield(cl.opened), TIMEOUT)
        if echo_once:
            cl.send()
            await asyncio.wait_for(asyncio.shield(cl.echoed), TIMEOUT)

    for start in range(0, n, BATCH):
        await asyncio.gather(*(one() for _ in range(min(BATCH, n - start))))
    return clients


async def close_clients(clients: list[WsClient], timeout: float = 3.0) -> None:
    """Close handshake on every client; abort whatever is still open after `timeout`."""
    for cl in clients:
        cl.close()
    pending = [cl.lost for cl in clients if not cl.lost.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for cl in clients:
        if not cl.lost.done() and cl.transport is not None:
            cl.transport.abort()
    await asyncio.sleep(0)


def make_payload(size: int, binary: bool) -> tuple[bytes, int]:
    if binary:
        return os.urandom(size), OP_BINARY
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    return bytes(alphabet[b % len(alphabet)] for b in os.urandom(size)), OP_TEXT


# =========================================================================== load generator

def _emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


async def loadgen(port: int, path: str, connections: int, size: int, binary: bool,
                  warmup: float, duration: float) -> dict:
    """Closed loop over `connections` WebSockets; prints `start`/`end` events on stdout
    at the edges of the measured window, and returns the result."""
    stats = ClientStats()
    payload, opcode = make_payload(size, binary)
    clients: list[WsClient] = []
    try:
        await open_clients(port, path, connections, stats, payload, opcode, loop_echo=True,
                           echo_once=False, out=clients)
        _emit("connected", connections=len(clients))
        for cl in clients:
            cl.send()
        await asyncio.sleep(warmup)
        stats.count, stats.lat = 0, []
        stats.measuring = True
        t0 = time.perf_counter()
        _emit("start")
        await asyncio.sleep(duration)
        stats.measuring = False
        t1 = time.perf_counter()
        _emit("end")
        stats.running = False
    finally:
        stats.running = False
        await close_clients(clients)
    lat = sorted(stats.lat)
    elapsed = t1 - t0
    ms = 1000.0
    return {
        "connections": connections, "message_bytes": size, "binary": binary,
        "warmup_s": warmup, "duration_s": round(elapsed, 4),
        "messages": stats.count, "msg_per_s": round(stats.count / elapsed, 1),
        "latency_ms": {
            "p50": round(percentile(lat, 0.50) * ms, 3) if lat else None,
            "p90": round(percentile(lat, 0.90) * ms, 3) if lat else None,
            "p99": round(percentile(lat, 0.99) * ms, 3) if lat else None,
            "max": round(lat[-1] * ms, 3) if lat else None,
            "mean": round(sum(lat) / len(lat) * ms, 3) if lat else None,
        },
        "errors": stats.errors, "first_error": stats.first_error,
        "echoes_total": sum(cl.echoes for cl in clients),
    }


# =========================================================================== relay alone

class _NullTransport(asyncio.Transport):
    """Stands in for a socket: counts what the relay writes, never pauses."""

    def __init__(self, loop) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = None
        self.closing = False
        self.nbytes = 0

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def write(self, data) -> None:
        self.nbytes += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def get_write_buffer_size(self) -> int:
        return 0


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n <= 125:
        head = bytes([0x80 | opcode, n])
    elif n <= 0xFFFF:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload


async def relay_micro(rounds: int, size: int, binary: bool) -> dict:
    """The relay's own cost per echo round trip (one client frame up, one upstream frame
    down), in this process, with transports that do no I/O: `wsrelay` + wsproto only.
    Also the wsproto calls the relay makes (parse on one leg, serialise on the other),
    timed bare, to split the relay's cost into wsproto and the rest."""
    from wsproto.connection import Connection, ConnectionType

    from edgeplane.websocket.relay import RelaySettings, start_relay

    loop = asyncio.get_running_loop()
    payload, opcode = make_payload(size, binary)
    up_frame = client_frame(opcode, payload, os.urandom(4))  # what a client sends
    down_frame = server_frame(opcode, payload)  # what an upstream sends
    ct, ut = _NullTransport(loop), _NullTransport(loop)
    relay = start_relay(loop, ct, ut, settings=RelaySettings())
    cleg, uleg = ct.protocol, ut.protocol
    warm = min(1000, rounds)

    def relay_rounds(k: int) -> float:
        t = time.perf_counter()
        for _ in range(k):
            cleg.data_received(up_frame)
            uleg.data_received(down_frame)
        return time.perf_counter() - t

    relay_rounds(warm)
    server, client = Connection(ConnectionType.SERVER), Connection(ConnectionType.CLIENT)

    def bare_rounds(k: int) -> float:
        t = time.perf_counter()
        for _ in range(k):
            server.receive_data(up_frame)      # client leg: parse + unmask
            for ev in server.events():
                client.send(ev)                # upstream leg: mask + serialise
            client.receive_data(down_frame)    # upstream leg: parse
            for ev in client.events():
                server.send(ev)                # client leg: serialise
        return time.perf_counter() - t

    bare_rounds(warm)
    dt = bare = float("inf")
    for _ in range(3):  # alternated, best of three: the least disturbed
        dt = min(dt, relay_rounds(rounds))
        bare = min(bare, bare_rounds(rounds))
    st = relay.stats
    total = 3 * rounds + warm
    ok = st.messages_in == st.messages_out == total and ct.nbytes == total * len(down_frame)
    ct.close()
    ut.close()
    await asyncio.sleep(0)
    return {
        "rounds": rounds, "message_bytes": size, "binary": binary, "relayed_ok": ok,
        "relay_us_per_round_trip": round(dt / rounds * 1e6, 2),
        "wsproto_us_per_round_trip": round(bare / rounds * 1e6, 2),
    }


# =========================================================================== orchestration

GATEWAY_CONFIG = {
    "workers": 1,
    "log_level": "warning",
    "access_log": {"destination": "off"},
    "routes": [
        {"route": "GET /ws", "integration": {"type": "http", "upstream": "echo"}},
        {"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": "ok",
                                                "content_type": "text/plain"}},
    ],
}


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(1, pin=not args.no_pin)
        self.n_started = 0

    def _name(self, base: str) -> str:
        self.n_started += 1
        return f"{self.n_started:02d}-{base}"

    def start_upstream(self) -> tuple[subprocess.Popen, int]:
        port = free_port()
        name = self._name("echo-upstream")
        proc = self.procs.start(name, [sys.executable, str(Path(__file__).resolve()), "--serve-echo",
                                       str(port)], self.plan.load)
        try:
            wait_http(port, "/", proc, timeout=15)
        except RuntimeError as exc:
            raise RuntimeError(f"echo upstream did not start: {exc}\n{self.procs.log_tail(name)}") from None
        return proc, port

    def start_gateway(self, upstream_port: int, max_connections: int,
                      profile: str | None = None) -> tuple[subprocess.Popen, int, int]:
        port, admin = free_port(), free_port()
        cfg = json.loads(json.dumps(GATEWAY_CONFIG))
        cfg["listen"] = [f"127.0.0.1:{port}"]
        cfg["admin"] = {"listen": f"127.0.0.1:{admin}", "insecure": True}
        cfg["upstreams"] = {"echo": {
            "targets": [f"http://127.0.0.1:{upstream_port}"],
            "pool": {"max_connections": max_connections, "max_waiters": max_connections},
        }}
        name = self._name("gateway")
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        argv = [sys.executable]
        if profile:
            argv += ["-m", "cProfile", "-o", profile]
        argv += ["-m", "edgeplane", "serve", "-c", str(path)]
        proc = self.procs.start(name, argv, self.plan.server)
        try:
            wait_http(admin, "/healthz", proc, timeout=20)
            wait_http(port, "/ping", proc, timeout=5)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway did not start: {exc}\n{self.procs.log_tail(name)}") from None
        return proc, port, admin

    # -- echo throughput --------------------------------------------------------------
    def run_loadgen(self, label: str, port: int, watch: dict[str, int]) -> dict:
        a = self.args
        name = self._name(f"loadgen-{label}")
        argv = [sys.executable, str(Path(__file__).resolve()), "--loadgen", str(port),
                "--path", "/ws", "-c", str(a.connections), "-s", str(a.size),
                "-d", str(a.duration), "--warmup", str(a.warmup)] + (["--binary"] if a.binary else [])
        proc = self.procs.start(name, argv, self.plan.load, stdout=subprocess.PIPE)
        watch = dict(watch, loadgen=proc.pid)
        deadline = time.monotonic() + a.warmup + a.duration + 60
        reader = _Lines(proc.stdout.fileno())
        cpu0 = cpu1 = None
        cores0 = cores1 = {}
        t0 = t1 = 0.0
        result = None
        try:
            while True:
                line = reader.next(deadline)
                if line is None:
                    break
                ev = json.loads(line)
                if ev["event"] == "start":
                    t0, cpu0 = time.monotonic(), {k: cpu_split(p) for k, p in watch.items()}
                    cores0 = core_ticks()
                elif ev["event"] == "end":
                    t1, cpu1 = time.monotonic(), {k: cpu_split(p) for k, p in watch.items()}
                    cores1 = core_ticks()
                elif ev["event"] == "result":
                    result = ev["result"]
            proc.wait(max(1.0, deadline - time.monotonic()))
        except (TimeoutError, subprocess.TimeoutExpired):
            raise RuntimeError(f"load generator ({label}) did not finish in time\n"
                               f"{self.procs.log_tail(name)}") from None
        finally:
            self.procs.stop(proc)
            proc.stdout.close()
        if result is None or cpu0 is None or cpu1 is None:
            raise RuntimeError(f"load generator ({label}) failed (status {proc.returncode})\n"
                               f"{self.procs.log_tail(name)}")
        window = t1 - t0
        cpu = {k: round(sum(cpu1[k]) - sum(cpu0[k]), 3) for k in watch}
        busy = {c: (cores1[c][0] - cores0[c][0]) / CLK_TCK for c in cores1 if c in cores0}
        # CPU time of the machine not charged to the processes watched: other processes,
        # this orchestrator; above OTHER_CPU_WARN s/s the run was disturbed.
        other = sum(busy.values()) - sum(cpu.values())
        msgs = max(1, result["messages"])
        result.update({
            "target": label,
            "cpu_window_s": round(window, 3),
            "cpu_s": cpu,
            "cpu_user_s": {k: round(cpu1[k][0] - cpu0[k][0], 3) for k in watch},
            "cpu_sys_s": {k: round(cpu1[k][1] - cpu0[k][1], 3) for k in watch},
            "cpu_util": {k: round(v / window, 3) for k, v in cpu.items()},
            "core_busy": {str(c): round(b / window, 3) for c, b in sorted(busy.items())},
            "other_cpu_util": round(max(0.0, other) / window, 3),
            "cpu_us_per_msg": {k: round(v / msgs * 1e6, 2) for k, v in cpu.items()},
        })
        return result

    def echo_phase(self) -> dict:
        a = self.args
        up, up_port = self.start_upstream()
        gw = None
        try:
            gw, gw_port, admin = self.start_gateway(up_port, max(1024, a.connections * 2),
                                                    profile=a.profile_gateway)
            watch = {"gateway": gw.pid, "upstream": up.pid}
            direct = self.run_loadgen("direct", up_port, watch)
            proxied = self.run_loadgen("proxied", gw_port, watch)
            proxied["gateway_upstreams"] = _get_json(admin, "/upstreams")
        finally:
            if gw is not None:
                self.procs.stop(gw, timeout=10.0)  # SIGTERM: a profiled gateway writes its profile
            self.procs.stop(up)
        ratio = proxied["msg_per_s"] / direct["msg_per_s"] if direct["msg_per_s"] else None
        return {"direct": direct, "proxied": proxied,
                "ratio_proxied_direct": round(ratio, 3) if ratio is not None else None}

    # -- idle memory -----------------------------------------------------------------
    def idle_phase(self) -> dict:
        n = self.args.idle_connections
        up, up_port = self.start_upstream()
        gw = None
        try:
            gw, gw_port, admin = self.start_gateway(up_port, n + WARM_CONNECTIONS + 1000)
            out = _run(self._idle(n, up, up_port, gw, gw_port))
            out["gateway_upgraded"] = _upgraded(_get_json(admin, "/upstreams"))
            return out
        finally:
            if gw is not None:
                self.procs.stop(gw)
            self.procs.stop(up)

    async def _idle(self, n: int, up, up_port: int, gw, gw_port: int) -> dict:
        payload, opcode = make_payload(self.args.size, self.args.binary)
        settle = self.args.settle
        out: dict = {"connections": n, "message_bytes": self.args.size, "settle_s": settle}

        async def measure(pid: int, port: int) -> dict:
            stats = ClientStats()
            clients: list[WsClient] = []
            try:
                await open_clients(port, "/ws", WARM_CONNECTIONS, stats, payload, opcode,
                                   loop_echo=False, echo_once=True, out=clients)
                await asyncio.sleep(settle)
                before = _rss(pid)
                t = time.monotonic()
                await open_clients(port, "/ws", n, stats, payload, opcode,
                                   loop_echo=False, echo_once=True, out=clients)
                open_s = time.monotonic() - t
                await asyncio.sleep(settle)
                after = _rss(pid)
                alive = sum(1 for cl in clients if not cl.lost.done())
            finally:
                await close_clients(clients)
            if stats.errors:
                raise RuntimeError(f"idle connections: {stats.errors} errors ({stats.first_error})")
            return {
                "rss_before_mib": round(before / 2**20, 2), "rss_after_mib": round(after / 2**20, 2),
                "added_mib": round((after - before) / 2**20, 2),
                "per_connection_kib": round((after - before) / 1024 / n, 2),
                "open_seconds": round(open_s, 2), "alive_at_reading": alive,
                "expected_alive": n + WARM_CONNECTIONS,
            }

        if not self.args.skip_direct_idle:
            out["upstream_direct"] = await measure(up.pid, up_port)
        out["gateway"] = await measure(gw.pid, gw_port)
        return out

    # -- whole run ---------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        data: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
            "pinning": self.plan.note,
            "gateway_cores": sorted(self.plan.server or []),
            "load_cores": sorted(self.plan.load or []),
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "loadavg_start": loadavg(),
            "args": {k: v for k, v in vars(a).items() if k not in ("serve_echo", "loadgen")},
        }
        if not a.skip_echo:
            data["echo"] = self.echo_phase()
        if not a.skip_idle:
            data["idle"] = self.idle_phase()
        if not a.skip_micro:
            data["relay_micro"] = _run(relay_micro(a.micro_rounds, a.size, a.binary))
        data["loadavg_end"] = loadavg()
        data["budget"] = budget_rows(data)
        return data


class _Lines:
    """Lines from a pipe, with a deadline (no thread; select + os.read)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def _rss(pid: int) -> int:
    return sum(rss_bytes(pid).values())


def cpu_split(root: int) -> tuple[float, float]:
    """(utime, stime) seconds of `root` and its descendants, from /proc/<pid>/stat (the
    same fields procs.cpu_seconds sums)."""
    user = system = 0
    for pid in descendants(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, all ticks) from /proc/stat (busy excludes idle and iowait)."""
    out = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[int(name[3:])] = (sum(v[:8]) - v[3] - v[4], sum(v[:8]))
    return out


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _get_json(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _upgraded(upstreams: dict | None) -> int | None:
    """Connections the gateway's pools handed to WebSocket relays (`closed.upgraded`)."""
    if not upstreams:
        return None
    total = 0

    def walk(node) -> None:
        nonlocal total
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "upgraded" and isinstance(v, int):
                    total += v
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(upstreams)
    return total


def budget_rows(data: dict) -> list[dict]:
    rows = []
    idle = data.get("idle")
    if idle:
        g = idle["gateway"]
        rows.append({"figure": "memory per idle proxied WebSocket (gateway RSS)",
                     "budget": f"<= {BUDGET_IDLE_KIB:g} KiB", "measured": g["per_connection_kib"],
                     "unit": "KiB", "met": g["per_connection_kib"] <= BUDGET_IDLE_KIB})
    echo = data.get("echo")
    if echo and echo["ratio_proxied_direct"] is not None:
        rows.append({"figure": "proxied / direct echo messages/s",
                     "budget": f">= {BUDGET_RATIO:g}", "measured": echo["ratio_proxied_direct"],
                     "unit": "", "met": echo["ratio_proxied_direct"] >= BUDGET_RATIO})
    return rows


# =========================================================================== report

def _fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(head, widths, strict=False)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=False))))
    return "\n".join(lines)


def print_report(data: dict) -> None:
    print(f"pinning: {data['pinning']}")
    echo = data.get("echo")
    if echo:
        d = echo["direct"]
        kind = "binary" if d["binary"] else "text"
        print(f"\nEcho, closed loop: {d['connections']} connections, {d['message_bytes']}-byte {kind} "
              f"messages, {d['warmup_s']:g} s warm-up + {d['duration_s']:.2f} s measured")
        rows = []
        for r in (echo["direct"], echo["proxied"]):
            u, us = r["cpu_util"], r["cpu_us_per_msg"]
            rows.append([r["target"], _fmt(r["msg_per_s"], 0), _fmt(r["latency_ms"]["p50"], 3),
                         _fmt(r["latency_ms"]["p99"], 3), _fmt(r["errors"]),
                         _fmt(u["gateway"], 2), _fmt(us["gateway"], 1),
                         _fmt(u["upstream"], 2), _fmt(us["upstream"], 1),
                         _fmt(u["loadgen"], 2), _fmt(us["loadgen"], 1), _fmt(r["other_cpu_util"], 2),
                         " ".join(f"{v:.2f}" for v in r["core_busy"].values())])
        print(_table(["target", "msg/s", "p50 ms", "p99 ms", "errors", "gw CPU", "gw us/msg",
                      "up CPU", "up us/msg", "gen CPU", "gen us/msg", "other CPU", "cores busy"], rows))
        busy = [r["target"] for r in (echo["direct"], echo["proxied"]) if r["other_cpu_util"] > OTHER_CPU_WARN]
        if busy:
            print(f"WARNING: other processes used the CPUs during the {' and '.join(busy)} run "
                  f"(other CPU > {OTHER_CPU_WARN}): those figures are disturbed; rerun on a quiet machine")
        print(f"ratio proxied/direct: {_fmt(echo['ratio_proxied_direct'], 3)}   "
              f"gateway CPU per message (proxied): {_fmt(echo['proxied']['cpu_us_per_msg']['gateway'], 1)} us "
              f"({_fmt(echo['proxied']['cpu_s']['gateway'], 2)} CPU-s / {echo['proxied']['messages']:,} msgs)")
        pu, ps_ = echo["proxied"]["cpu_user_s"]["gateway"], echo["proxied"]["cpu_sys_s"]["gateway"]
        print(f"gateway CPU split (proxied): user {_fmt(pu, 2)} s, system {_fmt(ps_, 2)} s")
        print("(CPU = CPU-seconds / measured seconds, 1.0 = one core busy; us/msg = CPU per echo "
              "round trip; other CPU = the machine's busy time not charged to these three "
              "processes (above 0.1: disturbed); cores busy = per core, from /proc/stat)")
    idle = data.get("idle")
    if idle:
        print(f"\nIdle WebSockets: {idle['connections']:,} connections, one echo each, then idle "
              f"({WARM_CONNECTIONS} warm-up connections open before the first reading)")
        rows = []
        for key, label in (("gateway", "gateway (proxied)"), ("upstream_direct", "echo upstream (direct)")):
            r = idle.get(key)
            if r:
                rows.append([label, _fmt(r["rss_before_mib"], 1), _fmt(r["rss_after_mib"], 1),
                             _fmt(r["added_mib"], 1), _fmt(r["per_connection_kib"], 2),
                             f"{r['alive_at_reading']}/{r['expected_alive']}", _fmt(r["open_seconds"], 2)])
        print(_table(["process", "RSS before MiB", "after MiB", "added MiB", "KiB/conn", "alive",
                      "open s"], rows))
        if idle.get("gateway_upgraded") is not None:
            print(f"gateway pool connections handed to relays (upgraded): {idle['gateway_upgraded']:,}")
    micro = data.get("relay_micro")
    if micro:
        line = (f"\nRelay alone (wsrelay + wsproto, fake transports, this process): "
                f"{micro['relay_us_per_round_trip']:.2f} us per echo round trip (2 frames relayed), "
                f"of which the bare wsproto calls {micro['wsproto_us_per_round_trip']:.2f} us")
        if echo:
            gw_us = echo["proxied"]["cpu_us_per_msg"]["gateway"]
            line += (f"; the gateway spent {gw_us:.1f} us per round trip in the proxied run, so "
                     f"{max(0.0, gw_us - micro['relay_us_per_round_trip']):.1f} us went to the "
                     f"event loop, syscalls and the kernel")
        print(line + ("" if micro["relayed_ok"] else "  [WARNING: counters did not match]"))
    if data["budget"]:
        print("\nBudget")
        print(_table(["figure", "budget", "measured", "met"],
                     [[r["figure"], r["budget"], f"{r['measured']:g} {r['unit']}".strip(),
                       "yes" if r["met"] else "NO"] for r in data["budget"]]))


def print_profile(path: str, top: int = 25) -> None:
    import pstats
    try:
        st = pstats.Stats(path)
    except (OSError, TypeError, EOFError) as exc:
        print(f"\nprofile {path}: not readable ({exc})")
        return
    print(f"\ncProfile of the gateway (whole process life; top {top} by own time): {path}")
    st.sort_stats("tottime").print_stats(top)


# =========================================================================== CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Budget rows: gateway RSS per idle proxied WebSocket <= {BUDGET_IDLE_KIB:g} KiB; "
               f"proxied/direct echo messages/s >= {BUDGET_RATIO:g}. Pinning: gateway on the first "
               "core, echo upstream + load generator on the others (benches/procs.cpu_plan). "
               "Prints tables and the budget rows; --json FILE adds every figure (per-process "
               "CPU user/system, per-core busy time, the gateway's /upstreams telemetry). "
               "Exit status 1 on a failed run (a process that did not start, a connection or "
               "handshake timing out, an echo that did not match), 130 on Ctrl-C; every child "
               "is stopped either way.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--connections", type=int, default=64,
                   help="echo: concurrent WebSockets of the closed loop")
    p.add_argument("-s", "--size", type=int, default=64,
                   help="message payload bytes (echo and idle; at most 65536, the relay allows 128 KiB)")
    p.add_argument("-d", "--duration", type=float, default=5.0, help="echo: measured seconds per target")
    p.add_argument("--warmup", type=float, default=1.0, help="echo: warm-up seconds per target")
    p.add_argument("--binary", action="store_true", help="binary messages instead of (ASCII) text")
    p.add_argument("-n", "--idle-connections", type=int, default=2000,
                   help="idle: WebSockets opened through the gateway (and directly to the upstream)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="idle: seconds to wait before each RSS reading")
    p.add_argument("--skip-echo", action="store_true", help="skip the echo throughput part")
    p.add_argument("--skip-idle", action="store_true", help="skip the idle memory part")
    p.add_argument("--skip-direct-idle", action="store_true",
                   help="idle: do not measure the upstream's own per-connection RSS")
    p.add_argument("--skip-micro", action="store_true",
                   help="skip timing the relay alone (in this process, no sockets)")
    p.add_argument("--micro-rounds", type=int, default=10000,
                   help="relay alone: echo round trips timed")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--profile-gateway", metavar="FILE",
                   help="run the echo gateway under cProfile, write FILE, print its top functions "
                        "(inflates the figures)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temp dir with the generated configs and each process's log")
    p.add_argument("--path", default="/ws", help="--loadgen: request path of the upgrade")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--serve-echo", metavar="PORT", type=int,
                   help="only run the WebSocket echo upstream on 127.0.0.1:PORT (used by the bench)")
    g.add_argument("--loadgen", metavar="PORT", type=int,
                   help="only run the closed-loop load generator against 127.0.0.1:PORT and print "
                        "JSON events (connected/start/end/result) on stdout (used by the bench)")
    a = p.parse_args(argv)
    if a.connections < 1 or a.size < 0 or a.size > 65536 or a.duration <= 0 or a.warmup < 0 \
            or a.idle_connections < 1 or a.settle < 0 or a.micro_rounds < 1:
        p.error("need --connections >= 1, 0 <= --size <= 65536, --duration > 0, --warmup >= 0, "
                "--idle-connections >= 1, --settle >= 0, --micro-rounds >= 1")
    return a


def raise_fd_limit(n: int) -> int:
    """Soft RLIMIT_NOFILE up to what N idle WebSockets need (gateway: 2 per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * (n + WARM_CONNECTIONS) + 4096
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    got = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if got < 2 * (n + WARM_CONNECTIONS) + 256:
        raise RuntimeError(f"descriptor limit {got} is too low for {n} idle connections "
                           f"(hard limit {hard}); lower --idle-connections")
    return got


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_echo is not None:
        _run(serve_echo(args.serve_echo))
        return 0
    if args.loadgen is not None:
        result = _run(loadgen(args.loadgen, args.path, args.connections, args.size, args.binary,
                              args.warmup, args.duration))
        _emit("result", result=result)
        return 0

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-wsbench-"))
    bench = Bench(args, workdir)
    try:
        raise_fd_limit(args.idle_connections if not args.skip_idle else 0)
        data = bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process started", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:  # OSError: also connect/handshake timeouts
        print(f"benches/ws_bench.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        bench.procs.close()
        if args.keep_workdir:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(data)
    if args.profile_gateway:
        print_profile(args.profile_gateway)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    echo = data.get("echo") or {}
    failed = [f"{r['target']}: {r['errors']} errors, first: {r['first_error']}"
              for r in (echo.get("direct"), echo.get("proxied")) if r and r["errors"]]
    if failed:
        print("FAILED echo run(s): " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
