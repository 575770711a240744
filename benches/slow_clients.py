#!/usr/bin/env python3
"""Slow and hostile clients at scale: what N trickling,
idle or body-trickling connections do to a *good* client's latency.

Each phase starts a fresh gateway (1 worker, access log off, `limits.max_connections:
25000`, upstream pool `max_connections: 64`) in front of one demo upstream that
serves the whole run, then measures two good clients side by side for `--duration`:

- `keep-alive`: one connection, sequential `GET /2b` (closed loop, `--think` ms
  between a response and the next request);
- `fresh`: a new connection per request (`Connection: close`), connect time included:
  a connection cap hurts new connections first.

Phases (`--phases`):

| phase               | attack (from 127.0.0.2, 127.0.0.3, ..., `--per-address` each)                     |
| ------------------- | --------------------------------------------------------------------------------- |
| `quiet`             | none: the baseline (run again last, as `quiet#2`: the run's own noise)             |
| `heads`             | N connections send a request head one byte every 2-3 s (jittered): 408 after     |
|                     | `limits.head_timeout` (from accept), then they reconnect at once                  |
| `idle`              | N connections never write; the gateway closes them after head_timeout; reconnect   |
| `bodies`            | `--body-connections` POST /echo heads with Content-Length: 100000, then the body  |
|                     | one byte every ~3 s (cut with 408 by `limits.min_body_rate`); reconnect           |
| `heads-capped`      | `heads` with `limits.max_connections: --cap` (10000, the old per-worker default;  |
|                     | `--cap default` leaves the key out): how many good-client connections it refuses   |

The attack runs in its own process (asyncio + uvloop, raw non-blocking sockets and
low-level protocols: one small object and one timer per connection; RLIMIT_NOFILE
raised to the hard limit). It opens its connections evenly over `--ramp` seconds
(default: head_timeout, so the 408 / reconnect churn is steady rather than in waves),
and the good clients start once it is ramped up. Pinning as benches/run.py: the
gateway on core 0; upstream, attacker, good clients (and this controller) on core 1;
with 3 or more cores the attacker gets the last core to itself.

Per phase: good-client p50 / p99 / max / errors for both clients and the ratio of p99
to the quiet phase (target <= 2x); attacker connections open (the gateway's
`/stats` `connections_open`, sampled every 0.5 s, and the attacker's own count);
the gateway's CPU-seconds and utilisation over the window and its RSS at the end;
the responses attackers got (408s), the gateway's refused connections; and, for the
diagnosis of a slow phase, each process's run-queue wait (`/proc/*/schedstat`: time
runnable but not running, i.e. starved of its core), per core the busy seconds not
spent by this bench's own processes ("other": someone else's load on a shared
machine), and the latency of the admin `/stats` call (served by the worker's event
loop). `--probe` runs the gateway under an in-process probe (`_probe`, no change to
the gateway's code) that records its GC pauses and its event-loop lag.

    .venv/bin/python benches/slow_clients.py                                  # N=10,000, 20 s phases
    .venv/bin/python benches/slow_clients.py --connections 500 --duration 5   # development
    .venv/bin/python benches/slow_clients.py --phases quiet,heads --per-ip-cap 200
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from procs import (  # noqa: E402
    Procs,
    cpu_plan,
    cpu_seconds,
    descendants,
    edgeplane_argv,
    free_port,
    guarded,
    rss_bytes,
    wait_http,
    wait_line,
    write_json,
)
from report import table as _table  # noqa: E402

MIB = 1024 * 1024
PHASES = ("quiet", "heads", "idle", "bodies", "heads-capped")
# The trailing quiet phase is a noise check: p99 of the same quiet load, minutes later.
DEFAULT_PHASES = "quiet,heads,idle,bodies,heads-capped,quiet"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
GOOD_PATH = "/2b"
ATTACK_BODY_PATH = "/echo"
BODY_LENGTH = 100_000


# =========================================================================== attacker process


class Attack:
    """N attack connections in one event loop; each slot reconnects when its
    connection ends, so N stay open or connecting."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.loop = asyncio.get_running_loop()
        self.addr = (a.host, a.port)
        self.open = 0
        self.connecting = 0
        self.waiting = 0  # backing off after an error
        self.started = 0  # slots started by the ramp
        self.ramped = False
        self.c = {"connects": 0, "connect_errors": 0, "resets": 0, "closed_by_server": 0,
                  "closed_without_response": 0, "refused": 0, "bytes_sent": 0}
        self.status: dict[str, int] = {}
        if a.mode == "heads":
            # Never completes at a byte every 2-3 s: ~4 bytes per head_timeout.
            self.payload, self.every = b"GET /2b HTTP/1.1\r\nHost: bench\r\nUser-Agent: " + b"x" * 4000, (2.0, 3.0)
            self.head = b""
        elif a.mode == "bodies":
            self.head = (f"POST {ATTACK_BODY_PATH} HTTP/1.1\r\nHost: bench\r\n"
                         f"Content-Type: application/octet-stream\r\nContent-Length: {BODY_LENGTH}\r\n\r\n").encode()
            self.payload, self.every = b"x" * BODY_LENGTH, (2.5, 3.5)
        else:  # idle
            self.payload, self.every, self.head = b"", (0.0, 0.0), b""

    def ip(self, slot: int) -> str:
        n = self.a.first_ip + slot // self.a.per_address  # 127.0.0.2 upward
        return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def start(self, slot: int) -> None:
        self.loop.create_task(self.connect(slot))

    async def connect(self, slot: int) -> None:
        self.connecting += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # The port is chosen at connect() against the whole 4-tuple, not at bind().
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.ip(slot), 0))
            await self.loop.sock_connect(sock, self.addr)
            await self.loop.create_connection(lambda: Conn(self, slot), sock=sock)
        except OSError:
            sock.close()
            self.c["connect_errors"] += 1
            self.reconnect(slot, random.uniform(0.1, 0.5))
        finally:
            self.connecting -= 1

    def reconnect(self, slot: int, delay: float) -> None:
        if delay <= 0:
            self.start(slot)
            return
        self.waiting += 1
        self.loop.call_later(delay, self._wake, slot)

    def _wake(self, slot: int) -> None:
        self.waiting -= 1
        self.start(slot)

    async def ramp(self) -> None:
        n, t0 = self.a.n, self.loop.time()
        rate = n / self.a.ramp if self.a.ramp > 0 else float("inf")
        for slot in range(n):
            due = t0 + slot / rate
            if due > self.loop.time() + 0.005:
                await asyncio.sleep(due - self.loop.time())
            self.start(slot)
            self.started += 1
            if slot % 200 == 199 and self.connecting > 2000:  # the listener's backlog is full: wait
                while self.connecting > 1000:
                    await asyncio.sleep(0.01)
        while self.connecting > 0.02 * n:
            await asyncio.sleep(0.05)
        self.ramped = True

    def snapshot(self) -> dict:
        return {"t": time.time(), "target": self.a.n, "mode": self.a.mode, "started": self.started,
                "ramped": self.ramped, "open": self.open, "connecting": self.connecting,
                "waiting": self.waiting, **self.c, "status": dict(self.status),
                "cpu_s": round(sum(os.times()[:2]), 3)}

    def write_status(self) -> None:
        tmp = self.a.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, self.a.status)

    async def report(self) -> None:
        while True:
            self.write_status()
            await asyncio.sleep(0.25)


class Conn(asyncio.Protocol):
    __slots__ = ("at", "slot", "tr", "timer", "pos", "answered", "since")

    def __init__(self, at: Attack, slot: int) -> None:
        self.at, self.slot = at, slot
        self.tr: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.pos = 0
        self.answered = False
        self.since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        at = self.at
        self.tr = transport  # type: ignore[assignment]
        self.since = at.loop.time()
        at.open += 1
        at.c["connects"] += 1
        if at.head:
            self.tr.write(at.head)
            at.c["bytes_sent"] += len(at.head)
        if at.payload:
            if at.a.mode == "heads":
                self.tick()  # the first byte at once: the head deadline runs from accept anyway
            else:
                self.timer = at.loop.call_later(random.uniform(*at.every), self.tick)

    def tick(self) -> None:
        at = self.at
        if self.pos < len(at.payload):
            self.tr.write(at.payload[self.pos:self.pos + 1])  # type: ignore[union-attr]
            self.pos += 1
            at.c["bytes_sent"] += 1
        self.timer = at.loop.call_later(random.uniform(*at.every), self.tick)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            code = data[9:12].decode("latin-1") if data.startswith(b"HTTP/1.") else "other"
            st = self.at.status
            st[code] = st.get(code, 0) + 1

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        at = self.at
        at.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        if not self.answered and at.loop.time() - self.since < 0.5:
            # Closed or reset at once without an answer: refused at accept by a cap
            # (the kernel completed the handshake, the gateway aborted). Back off
            # rather than spin: 0.1-0.5 s, so N connections retry ~N/0.3 times a second.
            at.c["refused"] += 1
            at.reconnect(self.slot, random.uniform(0.1, 0.5))
        elif exc is None:
            at.c["closed_by_server" if self.answered else "closed_without_response"] += 1
            at.reconnect(self.slot, 0)
        else:
            at.c["resets"] += 1
            at.reconnect(self.slot, random.uniform(0.1, 0.5))


def attacker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slow_clients.py _attack")
    p.add_argument("--mode", choices=("heads", "idle", "bodies"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--per-address", type=int, default=1000)
    p.add_argument("--first-ip", type=int, default=2, help="low 24 bits of the first source address (127.0.0.2)")
    p.add_argument("--ramp", type=float, default=10.0)
    p.add_argument("--status", required=True, help="JSON status file, rewritten every 0.25 s")
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.n + 200 > hard:
        print(f"--n {a.n} needs {a.n + 200} descriptors; the hard RLIMIT_NOFILE is {hard}", file=sys.stderr)
        return 2
    _use_uvloop()

    async def run() -> None:
        at = Attack(a)
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            at.loop.add_signal_handler(sig, done.set)
        at.loop.create_task(at.report())
        at.loop.create_task(at.ramp())
        await done.wait()
        at.write_status()
        sys.stdout.flush()
        os._exit(0)  # the kernel closes the N sockets faster than 10,000 transport.close()

    asyncio.run(run())
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the project depends on uvloop
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# =========================================================================== good client process


class Recorder:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.errors: dict[str, int] = {}
        self.on = False

    def ok(self, seconds: float) -> None:
        if self.on:
            self.lat.append(seconds)

    def err(self, kind: str) -> None:
        if self.on:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self, wall: float) -> dict:
        lat = sorted(self.lat)
        n = len(lat)

        def pct(q: float) -> float | None:
            return round(lat[max(0, math.ceil(n * q) - 1)] * 1e3, 3) if n else None

        return {"requests": n, "rps": round(n / wall, 1) if wall else None,
                "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p99.9": pct(0.999),
                               "max": round(lat[-1] * 1e3, 3) if n else None,
                               "mean": round(sum(lat) / n * 1e3, 3) if n else None},
                "errors": dict(self.errors), "errors_total": sum(self.errors.values())}


class _Resp:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


class Cut(Exception):
    """The connection ended (reset or EOF) before a whole response arrived."""

    def __init__(self, mid: bool) -> None:
        super().__init__("mid-response" if mid else "before any response byte")
        self.mid = mid


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, Cut):
        # A connection refused by a cap is accepted by the kernel and then reset by the
        # gateway: the client sees a reset (or EOF) before any byte of a response.
        return "cut_mid_response" if exc.mid else "reset_before_response"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset_before_response"
    return type(exc).__name__


async def _exchange(loop, sock: socket.socket, request: bytes) -> int:
    import httptools

    try:
        await loop.sock_sendall(sock, request)
    except (ConnectionResetError, BrokenPipeError):
        raise Cut(False) from None
    cb = _Resp()
    parser = httptools.HttpResponseParser(cb)
    got = False
    while not cb.done:
        try:
            data = await loop.sock_recv(sock, 65536)
        except (ConnectionResetError, BrokenPipeError):
            raise Cut(got) from None
        if not data:
            raise Cut(got)
        got = True
        parser.feed_data(data)
    return parser.get_status_code()


async def _connect(loop, host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def keepalive_client(host: str, port: int, stop: list, think: float, rec: Recorder,
                           timeout: float) -> None:
    loop = asyncio.get_running_loop()
    req = f"GET {GOOD_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    sock = None
    while not stop:
        try:
            async with asyncio.timeout(timeout):
                if sock is None:
                    sock = await _connect(loop, host, port)
                t0 = time.perf_counter()
                status = await _exchange(loop, sock, req)
            dt = time.perf_counter() - t0
            if status >= 400:
                rec.err(f"status_{status}")
            else:
                rec.ok(dt)
        except (OSError, Cut, TimeoutError) as exc:
            rec.err(_error_kind(exc))
            if sock is not None:
                sock.close()
                sock = None
            await asyncio.sleep(0.01)  # do not spin against a refusing gateway
            continue
        if think:
            await asyncio.sleep(think)


async def fresh_client(host: str, port: int, stop: list, think: float, rec: Recorder, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    req = f"GET {GOOD_PATH} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    while not stop:
        sock = None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                sock = await _connect(loop, host, port)
                status = await _exchange(loop, sock, req)
            dt = time.perf_counter() - t0
            if status >= 400:
                rec.err(f"status_{status}")
            else:
                rec.ok(dt)
        except (OSError, Cut, TimeoutError) as exc:
            rec.err(_error_kind(exc))
            await asyncio.sleep(0.01)
        finally:
            if sock is not None:
                sock.close()
        if think:
            await asyncio.sleep(think)


def good_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slow_clients.py _good")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--think", type=float, default=1.0, help="ms between a response and the next request")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    _use_uvloop()

    async def run() -> dict:
        stop: list = []
        ka, fr = Recorder(), Recorder()
        think = a.think / 1e3
        tasks = [asyncio.create_task(keepalive_client(a.host, a.port, stop, think, ka, a.timeout)),
                 asyncio.create_task(fresh_client(a.host, a.port, stop, think, fr, a.timeout))]
        await asyncio.sleep(a.warmup)
        ka.on = fr.on = True
        print("measuring", flush=True)  # the controller samples CPU etc. from here
        t0, cpu0, wait0 = time.perf_counter(), sum(os.times()[:2]), run_delay_s(os.getpid())
        await asyncio.sleep(a.duration)
        ka.on = fr.on = False
        wall = time.perf_counter() - t0
        cpu, wait = sum(os.times()[:2]) - cpu0, run_delay_s(os.getpid()) - wait0
        print("done", flush=True)
        stop.append(True)
        await asyncio.wait(tasks, timeout=a.timeout + 1)
        return {"duration": round(wall, 3), "think_ms": a.think, "cpu_s": round(cpu, 2),
                "run_queue_wait_ms": round(wait * 1e3, 1),
                "keepalive": ka.summary(wall), "fresh": fr.summary(wall)}

    out = asyncio.run(run())
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


# =========================================================================== gateway probe (--probe)

PROBE_TICK = 0.005


def probe_main(argv: list[str]) -> int:
    """`_probe OUT edgeplane-args...`: runs `edgeplane serve` in this process with two
    probes that do not touch the gateway's code: every garbage collection's generation
    and pause (gc.callbacks), and the event loop's lag (a callback due every 5 ms,
    scheduled once Gateway.start returned: how late it runs). Both go to OUT as
    [wall time, ...] rows, rewritten every second, so the controller can cut a window."""
    import gc

    out, rest = argv[0], argv[1:]
    gcs: list[tuple[float, int, float, float]] = []  # (time.time(), generation, pause s, CPU s)
    lags: list[tuple[float, float]] = []  # (time.time(), lag s)
    began = [0.0, 0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began[0], began[1] = time.perf_counter(), time.thread_time()
        else:
            gcs.append((time.time(), info["generation"], time.perf_counter() - began[0],
                        time.thread_time() - began[1]))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"gc": gcs, "lag": lags, "tick_s": PROBE_TICK}, f)
        os.replace(tmp, out)

    from edgeplane.runtime import gateway as gateway_mod

    start = gateway_mod.Gateway.start

    async def probed_start(self, *args, **kwargs):
        result = await start(self, *args, **kwargs)
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            now = time.perf_counter()
            lags.append((time.time(), now - due))
            loop.call_later(PROBE_TICK, tick, now + PROBE_TICK)

        def every_second() -> None:
            dump()
            loop.call_later(1.0, every_second)

        loop.call_later(PROBE_TICK, tick, time.perf_counter() + PROBE_TICK)
        loop.call_later(1.0, every_second)
        return result

    gateway_mod.Gateway.start = probed_start
    from edgeplane.runtime.cli import main as edgeplane_main

    try:
        return edgeplane_main(rest)
    finally:
        dump()


def probe_window(path: Path, t0: float, t1: float) -> dict | None:
    """Loop lag and GC pauses of the gateway between wall times t0 and t1."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    lag = sorted(v for t, v in d["lag"] if t0 <= t <= t1)
    gcs = [(g, v, c) for t, g, v, c in d["gc"] if t0 <= t <= t1]
    n = len(lag)

    def pct(q: float) -> float | None:
        return round(lag[max(0, math.ceil(n * q) - 1)] * 1e3, 2) if n else None

    out: dict = {"lag_ms": {"ticks": n, "p50": pct(0.5), "p99": pct(0.99), "p99.9": pct(0.999),
                            "max": round(lag[-1] * 1e3, 2) if n else None,
                            "over_5ms": sum(1 for v in lag if v > 0.005)},
                 "gc": {}}
    for gen in (0, 1, 2):
        pauses = [(v, c) for g, v, c in gcs if g == gen]
        out["gc"][str(gen)] = {"count": len(pauses), "total_ms": round(sum(v for v, _ in pauses) * 1e3, 1),
                               "max_ms": round(max(v for v, _ in pauses) * 1e3, 2) if pauses else None,
                               # the CPU the collections took: wall minus CPU is time the core was taken away
                               "cpu_total_ms": round(sum(c for _, c in pauses) * 1e3, 1),
                               "cpu_max_ms": round(max(c for _, c in pauses) * 1e3, 2) if pauses else None}
    return out


# =========================================================================== controller


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/slow_clients.py",
        description="A good client's latency while N slow or hostile clients (trickled heads, idle "
                    "connections, trickled bodies) hold connections to one gateway worker.",
        epilog="See benches/README.md (Slow and hostile clients) for what each figure means.")
    p.add_argument("-c", "--connections", type=int, default=10_000,
                   help="attack connections in the heads and idle phases (default 10000)")
    p.add_argument("--body-connections", type=int, default=1000,
                   help="attack connections in the bodies phase (default 1000)")
    p.add_argument("-d", "--duration", type=float, default=20.0, help="measured seconds per phase (default 20)")
    p.add_argument("--phases", default=DEFAULT_PHASES,
                   help=f"comma-separated, in order, repeats allowed (default {DEFAULT_PHASES}); "
                        f"known: {', '.join(PHASES)}")
    p.add_argument("--ramp", type=float, default=None,
                   help="seconds over which the attack connections are opened (default: head_timeout)")
    p.add_argument("--head-timeout", default=None, metavar="DURATION",
                   help="limits.head_timeout for the gateway (default: the gateway's, 10s)")
    p.add_argument("--per-address", type=int, default=1000,
                   help="attack connections per source address 127.0.0.2, .3, ... (default 1000)")
    p.add_argument("--per-ip-cap", type=int, default=0,
                   help="set limits.max_connections_per_ip on the gateway (default 0: off)")
    p.add_argument("--max-connections", type=int, default=25_000,
                   help="limits.max_connections for every phase but heads-capped (default 25000)")
    p.add_argument("--cap", default="10000",
                   help="limits.max_connections in heads-capped (default 10000, an earlier per-worker "
                        "default; 'default' leaves the key out: the gateway's own default)")
    p.add_argument("--pool", type=int, default=64, help="upstream pool max_connections (default 64)")
    p.add_argument("--think", type=float, default=1.0,
                   help="good clients: ms between a response and the next request (default 1; 0 = back to back)")
    p.add_argument("--probe", action="store_true",
                   help="diagnosis: run the gateway under an in-process probe (its GC pauses via gc.callbacks "
                        "and its event-loop lag via a 5 ms timer); costs the gateway a little CPU")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the results here (default benches/out/slow-clients-<timestamp>.json)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and process logs")
    a = p.parse_args(argv)
    a.phase_list = [x.strip() for x in a.phases.split(",") if x.strip()]
    bad = [x for x in a.phase_list if x not in PHASES]
    if bad:
        p.error(f"unknown phase(s) {', '.join(bad)} (known: {', '.join(PHASES)})")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(a.connections, a.body_connections) + 200 > hard:
        p.error(f"--connections {a.connections} needs about {a.connections + 200} descriptors in the "
                f"attacker and the gateway; the hard RLIMIT_NOFILE is {hard}")
    if a.cap != "default" and not a.cap.isdigit():
        p.error("--cap takes a number of connections or 'default'")
    if a.connections < 1 or a.duration <= 0 or a.per_address < 1:
        p.error("--connections, --duration and --per-address must be positive")
    return a




def gateway_config(a: argparse.Namespace, port: int, admin: int, upstream_port: int, capped: bool) -> dict:
    limits: dict = {}
    if not capped:
        limits["max_connections"] = a.max_connections
    elif a.cap != "default":
        limits["max_connections"] = int(a.cap)
    if a.per_ip_cap:
        limits["max_connections_per_ip"] = a.per_ip_cap
    if a.head_timeout:
        limits["head_timeout"] = a.head_timeout
    return {
        "listen": [f"127.0.0.1:{port}"],
        "workers": 1,
        "log_level": "warning",
        "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},
        "access_log": {"destination": "off"},
        "limits": limits,
        "upstreams": {"demo": {"targets": [f"http://127.0.0.1:{upstream_port}"],
                               "pool": {"max_connections": a.pool}}},
        "routes": [{"route": "$default", "integration": {"type": "http", "upstream": "demo"}}],
    }


def admin_get(port: int, path: str) -> tuple[dict | None, float]:
    """(JSON answer or None, seconds the call took)."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        body = conn.getresponse().read()
        conn.close()
        return json.loads(body), time.perf_counter() - t0
    except (OSError, ValueError):
        return None, time.perf_counter() - t0


def run_delay_s(root: int) -> float:
    """Seconds the threads of `root` and its descendants waited runnable for a CPU
    (/proc/<pid>/task/<tid>/schedstat, 2nd field, ns)."""
    total = 0
    for pid in descendants(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks: user+nice+system+irq+softirq, steal ticks) from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = line.split()
            v = [int(x) for x in f[1:9]]
            out[int(f[0][3:])] = (v[0] + v[1] + v[2] + v[5] + v[6], v[7])
    return out


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None




class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(1, pin=not a.no_pin)
        # With 3+ cores the attacker gets a load core of its own, so it cannot starve the
        # good clients and the upstream; with 2 they share core 1 (the run's note says so).
        load = sorted(self.plan.load or [])
        if len(load) >= 2:
            self.attack_cores: frozenset[int] | None = frozenset(load[-1:])
            self.client_cores: frozenset[int] | None = frozenset(load[:-1])
        else:
            self.attack_cores = self.client_cores = self.plan.load
        self.upstream: subprocess.Popen | None = None
        self.upstream_port = 0
        self.head_timeout = 10.0

    def pinning(self) -> str:
        if not self.plan.server:
            return self.plan.note
        fmt = lambda cores: ",".join(map(str, sorted(cores or ())))  # noqa: E731
        shared = " (sharing it: fewer than 3 cores)" if self.attack_cores == self.client_cores else ""
        return (f"gateway on core {fmt(self.plan.server)}; upstream, good clients and this controller on "
                f"core {fmt(self.client_cores)}; attacker on core {fmt(self.attack_cores)}{shared}")

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        proc = self.procs.start("upstream", edgeplane_argv() + ["demo-upstream", "--port", str(self.upstream_port)],
                                self.client_cores)
        try:
            wait_http(self.upstream_port, GOOD_PATH, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"upstream did not start: {exc}\n{self.procs.log_tail('upstream')}") from None
        self.upstream = proc

    def start_gateway(self, name: str, capped: bool) -> tuple[subprocess.Popen, int, int]:
        port, admin = free_port(), free_port()
        cfg_path = self.workdir / f"{name}.yaml"
        cfg_path.write_text(json.dumps(gateway_config(self.a, port, admin, self.upstream_port, capped),
                                       indent=2) + "\n")
        check = subprocess.run(edgeplane_argv() + ["validate", "-c", str(cfg_path)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"edgeplane validate refused {cfg_path}:\n{check.stdout}{check.stderr}")
        argv = edgeplane_argv() + ["serve", "-c", str(cfg_path)]
        if self.a.probe:
            argv = [sys.executable, __file__, "_probe", str(self.workdir / f"probe-{name}.json"),
                    "serve", "-c", str(cfg_path)]
        proc = self.procs.start(f"gateway-{name}", argv, self.plan.server)
        try:
            wait_http(port, GOOD_PATH, proc)
            wait_http(admin, "/healthz", proc)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway did not start: {exc}\n{self.procs.log_tail(f'gateway-{name}')}") from None
        return proc, port, admin

    def phase(self, label: str) -> dict:
        """One phase; `label` is its name, with #2, #3 ... when it is repeated."""
        a = self.a
        name = label.split("#")[0]
        mode = {"quiet": None, "heads": "heads", "idle": "idle", "bodies": "bodies",
                "heads-capped": "heads"}[name]
        n = 0 if mode is None else (a.body_connections if mode == "bodies" else a.connections)
        capped = name == "heads-capped"
        tag = label.replace("#", "-")
        gw, port, admin = self.start_gateway(tag, capped)
        attacker = None
        status_path = self.workdir / f"attack-{tag}.json"
        try:
            ramp_s = 0.0
            if mode:
                ramp = a.ramp if a.ramp is not None else self.head_timeout
                attacker = self.procs.start(
                    f"attack-{tag}",
                    [sys.executable, __file__, "_attack", "--mode", mode, "--port", str(port), "--n", str(n),
                     "--per-address", str(a.per_address), "--ramp", str(ramp), "--status", str(status_path)],
                    self.attack_cores)
                t0 = time.monotonic()
                while True:
                    st = read_status(status_path)
                    if st and st["ramped"]:
                        break
                    if attacker.poll() is not None:
                        raise RuntimeError(f"attacker exited with {attacker.returncode}:\n"
                                           f"{self.procs.log_tail(f'attack-{tag}')}")
                    if gw.poll() is not None:
                        raise RuntimeError(f"gateway died during the ramp:\n{self.procs.log_tail(f'gateway-{tag}')}")
                    if time.monotonic() - t0 > ramp + 60:
                        raise RuntimeError(f"attack not ramped up after {ramp + 60:.0f}s: {st}")
                    time.sleep(0.1)
                ramp_s = time.monotonic() - t0
                time.sleep(1.0)
            good_out = self.workdir / f"good-{tag}.json"
            good_log = self.workdir / f"good-{tag}.log"
            good = self.procs.start(
                f"good-{tag}",
                [sys.executable, __file__, "_good", "--port", str(port), "--duration", str(a.duration),
                 "--think", str(a.think), "--out", str(good_out)],
                self.client_cores)
            wait_line(good_log, "measuring", good, 30, who="good client")
            pids = {"gateway": gw.pid, "upstream": self.upstream.pid}  # the good client reports its own
            if attacker:
                pids["attacker"] = attacker.pid
            cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
            wait0 = {k: run_delay_s(v) for k, v in pids.items()}
            core0, self0 = core_ticks(), sum(os.times()[:2])
            stats0, _ = admin_get(admin, "/stats")
            st0 = read_status(status_path) if mode else None
            t0, wall0 = time.monotonic(), time.time()
            samples: list[dict] = []
            while good.poll() is None and "done" not in good_log.read_text():
                if time.monotonic() - t0 > a.duration + 60:
                    raise RuntimeError("good client did not finish in time")
                stats, took = admin_get(admin, "/stats")
                st = read_status(status_path) if mode else None
                samples.append({"gw_open": stats.get("connections_open") if stats else None,
                                "admin_ms": round(took * 1e3, 3),
                                "attack_open": st["open"] if st else 0,
                                "attack_connecting": st["connecting"] if st else 0})
                time.sleep(0.5)
            wall, wall1 = time.monotonic() - t0, time.time()
            cpu1 = {k: cpu_seconds(v) for k, v in pids.items()}
            wait1 = {k: run_delay_s(v) for k, v in pids.items()}
            core1, self1 = core_ticks(), sum(os.times()[:2])
            stats1, _ = admin_get(admin, "/stats")
            upstreams, _ = admin_get(admin, "/upstreams")
            st1 = read_status(status_path) if mode else None
            rss = sum(rss_bytes(gw.pid).values())
            good.wait(a.duration + 30)
            self.procs.stop(good)
            goodr = json.loads(good_out.read_text())
            probe = None
            if a.probe:
                time.sleep(1.2)  # the probe rewrites its file every second
                probe = probe_window(self.workdir / f"probe-{tag}.json", wall0, wall1)
        finally:
            if attacker is not None:
                self.procs.stop(attacker)
            self.procs.stop(gw)
        r = self.result(label, mode, n, ramp_s, wall, goodr, samples, cpu0, cpu1, wait0, wait1,
                        stats0, stats1, st0, st1, rss, upstreams, capped)
        r["cpu_s"]["controller"] = round(self1 - self0, 2)
        if a.probe:
            r["gateway"]["probe"] = probe
        r["cores"] = self.cores(core0, core1, r["cpu_s"])
        return r

    def cores(self, t0: dict, t1: dict, cpu: dict) -> dict:
        """Per core over the window: busy seconds, steal, and busy minus this bench's own
        processes pinned there ("other": someone else's load, interrupts, softirq)."""
        from procs import CLK_TCK

        ours: dict[int, float] = {}
        vague: set[int] = set()  # a group pinned to several cores: its CPU cannot be split
        for cores, names in ((self.plan.server, ("gateway",)), (self.attack_cores, ("attacker",)),
                             (self.client_cores, ("upstream", "good", "controller"))):
            if not cores:
                continue
            if len(cores) == 1:
                core = next(iter(cores))
                ours[core] = ours.get(core, 0.0) + sum(cpu.get(k, 0.0) for k in names)
            else:
                vague |= cores
        out = {}
        for core in sorted(t1):
            busy = (t1[core][0] - t0[core][0]) / CLK_TCK
            steal = (t1[core][1] - t0[core][1]) / CLK_TCK
            known = core in ours and core not in vague
            out[str(core)] = {"busy_s": round(busy, 2), "steal_s": round(steal, 2),
                              "other_s": round(busy - ours[core], 2) if known else None}
        return out

    def result(self, name, mode, n, ramp_s, wall, goodr, samples, cpu0, cpu1, wait0, wait1,
               stats0, stats1, st0, st1, rss, upstreams, capped) -> dict:
        def spread(key: str) -> dict | None:
            vals = sorted(s[key] for s in samples if s[key] is not None)
            if not vals:
                return None
            return {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]}

        cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
        waits = {k: round((wait1[k] - wait0[k]) * 1e3, 1) for k in wait0}
        cpu["good"], waits["good"] = goodr["cpu_s"], goodr["run_queue_wait_ms"]
        attack: dict = {"mode": mode, "target": n}
        if st0 and st1:
            status = {k: st1["status"].get(k, 0) - st0["status"].get(k, 0) for k in st1["status"]}
            attack.update({
                "ramp_s": round(ramp_s, 1),
                "responses": {k: v for k, v in status.items() if v},
                "408s": status.get("408", 0),
                **{k: st1[k] - st0[k] for k in ("connects", "connect_errors", "resets", "refused",
                                                "closed_by_server", "closed_without_response", "bytes_sent")},
                "open_own_count": spread("attack_open"), "connecting": spread("attack_connecting"),
            })
        errs0 = (stats0 or {}).get("errors", {}) or {}
        errs1 = (stats1 or {}).get("errors", {}) or {}
        gw_errors = {k: v - errs0.get(k, 0) for k, v in errs1.items() if v - errs0.get(k, 0)}
        pool = [{k: t.get(k) for k in ("opened", "requests", "in_use", "idle", "connecting", "waiters")}
                for u in (upstreams or {}).get("upstreams", []) for t in u.get("targets", [])]
        admin_ms = sorted(s["admin_ms"] for s in samples)
        return {
            "phase": name,
            "limits_max_connections": (self.a.cap if self.a.cap == "default" else int(self.a.cap)) if capped
            else self.a.max_connections,
            "window_s": round(wall, 2), "good": goodr, "attack": attack,
            "gateway": {
                "connections_open": spread("gw_open"),
                "cpu_s": cpu["gateway"], "cpu_util": round(cpu["gateway"] / wall, 3) if wall else None,
                "rss_end_mib": round(rss / MIB, 1), "errors": gw_errors,
                "admin_stats_ms": {"median": admin_ms[len(admin_ms) // 2] if admin_ms else None,
                                   "max": admin_ms[-1] if admin_ms else None},
                "pool_end": pool,
            },
            "cpu_s": cpu, "run_queue_wait_ms": waits,
        }

    def run(self) -> dict:
        a = self.a
        if a.head_timeout:
            from edgeplane.config.values import parse_duration
            self.head_timeout = parse_duration(a.head_timeout)
        print(f"pinning: {self.pinning()}", flush=True)
        self.start_upstream()
        results = []
        seen: dict[str, int] = {}
        for name in a.phase_list:
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            print(f"phase {label} ...", flush=True)
            r = self.phase(label)
            results.append(r)
            print("  " + one_line(r), flush=True)
            if self.upstream.poll() is not None:
                raise RuntimeError(f"the demo upstream exited ({self.upstream.returncode}) during {name}")
        return {"meta": {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pinning": self.pinning(),
                         "args": {k: v for k, v in vars(a).items()}, "edgeplane": edgeplane_version(),
                         "head_timeout_s": self.head_timeout},
                "results": results}


def edgeplane_version() -> str:
    try:
        out = subprocess.run(edgeplane_argv() + ["--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- report


def _f(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def one_line(r: dict) -> str:
    ka, fr = r["good"]["keepalive"], r["good"]["fresh"]
    return (f"keep-alive p99 {_f(ka['latency_ms']['p99'], 3)} ms ({ka['requests']} ok, {ka['errors_total']} err); "
            f"fresh p99 {_f(fr['latency_ms']['p99'], 3)} ms ({fr['requests']} ok, {fr['errors_total']} err); "
            f"gateway CPU {r['gateway']['cpu_s']} s, open {(r['gateway']['connections_open'] or {}).get('median')}")




def table(rows: list[list[str]], head: list[str]) -> str:
    return _table(head, rows, align_left=1)  # report.table: first column left, the rest right


def print_report(data: dict) -> None:
    res = data["results"]
    base = next((r for r in res if r["phase"] == "quiet"), None)

    def ratio(r: dict, client: str) -> str:
        if base is None:
            return "-"
        b = base["good"][client]["latency_ms"]["p99"]
        v = r["good"][client]["latency_ms"]["p99"]
        return f"{v / b:.2f}x" if b and v else "-"

    print(f"\nGood clients (think {data['meta']['args']['think']} ms; ratio = p99 / p99 of quiet; target <= 2x):")
    rows = []
    for r in res:
        for client, label in (("keepalive", "keep-alive"), ("fresh", "fresh conn")):
            g = r["good"][client]
            lat = g["latency_ms"]
            errs = ", ".join(f"{k} {v}" for k, v in sorted(g["errors"].items())) or "0"
            rows.append([r["phase"], label, str(g["requests"]), _f(lat["p50"], 3), _f(lat["p99"], 3),
                         _f(lat["max"], 1), ratio(r, client), errs])
    print(table(rows, ["phase", "client", "ok", "p50 ms", "p99 ms", "max ms", "p99/quiet", "errors"]))

    print("\nAttack and gateway (over the measured window; open = min/median/max of 0.5 s samples):")
    rows = []
    for r in res:
        at, gw = r["attack"], r["gateway"]
        o = gw["connections_open"] or {}
        own = at.get("open_own_count") or {}
        refused = gw["errors"].get("connection_limit", 0)
        rows.append([
            r["phase"], str(at["target"]),
            f"{o.get('min', '-')}/{o.get('median', '-')}/{o.get('max', '-')}",
            f"{own.get('min', '-')}/{own.get('median', '-')}/{own.get('max', '-')}" if own else "-",
            str(at.get("408s", "-")), str(at.get("connects", "-")),
            f"{at['refused']}/{at['resets']}" if "refused" in at else "-", str(refused),
            _f(gw["cpu_s"]), _f(gw["cpu_util"]), _f(gw["rss_end_mib"], 1),
            _f(gw["admin_stats_ms"]["median"], 1) + "/" + _f(gw["admin_stats_ms"]["max"], 1),
        ])
    print(table(rows, ["phase", "attackers", "gw conns open", "attacker open", "408s", "connects",
                       "refused/reset", "gw refused", "gw CPU s", "util", "RSS MiB", "/stats ms med/max"]))

    print("\nCPU-seconds and run-queue wait (ms runnable but not running) per process over the window:")
    rows = []
    for r in res:
        c, w = r["cpu_s"], r["run_queue_wait_ms"]
        rows.append([r["phase"]] + [f"{_f(c.get(k))} / {_f(w.get(k), 0)}" if k in c else "-"
                                     for k in ("gateway", "upstream", "good", "attacker")])
    print(table(rows, ["phase", "gateway (core 0)", "upstream", "good clients", "attacker"]))

    print("\nPer core over the window: busy s / steal s / other s (busy minus this bench's processes on it):")
    rows = []
    cores = sorted({c for r in res for c in r.get("cores", {})}, key=int)
    for r in res:
        cs = r.get("cores", {})
        rows.append([r["phase"], _f(r["window_s"])] + [
            f"{_f(cs[c]['busy_s'])} / {_f(cs[c]['steal_s'])} / {_f(cs[c]['other_s'])}" if c in cs else "-"
            for c in cores])
    print(table(rows, ["phase", "window s"] + [f"core {c}" for c in cores]))
    if any(r["gateway"].get("probe") for r in res):
        print("\nGateway probe (--probe): event-loop lag of a 5 ms timer, and garbage collections in the window:")
        rows = []
        for r in res:
            pr = r["gateway"].get("probe")
            if not pr:
                continue
            lag, gcs = pr["lag_ms"], pr["gc"]
            rows.append([r["phase"], _f(lag["p50"]), _f(lag["p99"]), _f(lag["p99.9"]), _f(lag["max"]),
                         str(lag["over_5ms"])] + [f"{gcs[g]['count']} / {_f(gcs[g]['total_ms'], 1)} / "
                                                  f"{_f(gcs[g]['max_ms'])} ({_f(gcs[g]['cpu_max_ms'])})"
                                                  for g in ("0", "1", "2")])
        print(table(rows, ["phase", "lag p50 ms", "p99", "p99.9", "max", "ticks > 5 ms",
                           "gen0 n / total ms / max (CPU)", "gen1 n / total / max (CPU)",
                           "gen2 n / total / max (CPU)"]))
    for r in res:
        if r["phase"] == "bodies":
            print(f"\nbodies: upstream pool at the end of the window: {r['gateway']['pool_end']}")
        if r["phase"].startswith("heads-capped"):
            fr, ka = r["good"]["fresh"], r["good"]["keepalive"]
            cap = r["limits_max_connections"]
            print(f"\n{r['phase']}: limits.max_connections {cap} with {r['attack']['target']} attackers: the "
                  f"gateway refused {r['gateway']['errors'].get('connection_limit', 0)} connections at accept "
                  f"in the window (attackers' retries included). Good clients: fresh-connection "
                  f"{fr['requests']} answered, {fr['errors'].get('reset_before_response', 0)} refused "
                  f"({fr['errors_total']} errors in all); keep-alive {ka['requests']} answered, "
                  f"{ka['errors'].get('reset_before_response', 0)} refused (it retries every 10 ms).")




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_attack"]:
        return attacker_main(argv[1:])
    if argv[:1] == ["_good"]:
        return good_main(argv[1:])
    if argv[:1] == ["_probe"]:
        return probe_main(argv[1:])
    a = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # every child (the gateway too) inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-slow-"))
    bench = Bench(a, workdir)
    # this controller shares the clients' core; the gateway has core 0 to itself
    data, code = guarded("benches/slow_clients.py", bench.run, bench.procs.close, workdir,
                         keep_workdir=a.keep_workdir, cores=bench.client_cores)
    if code is not None:
        return code
    print_report(data)
    print(f"\nJSON: {write_json(data, a.json, 'slow-clients')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
