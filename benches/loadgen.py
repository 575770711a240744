#!/usr/bin/env python3
"""Bundled HTTP/1.1 load generator (uvloop + httptools, several processes): owns the
Python load generation used when wrk is not installed, and the open-loop mode.

Two modes:

- **closed loop** (default): `--connections N` connections each send a request, wait
  for its response, and send the next; latency is from send to response.
- **open loop** (`--rate R`): requests are due at fixed times (R per second in total,
  spread over the processes) whatever the server does; each is sent on a free
  connection of the `--connections` pool as soon as one is free, and its latency is
  measured from its *intended* send time, so a stall shows up in the percentiles
  instead of silently slowing the generator down (no coordinated omission).  After
  `--duration` no new request is due; those queued or in flight get a grace period
  (at most `--timeout`, 2 s) to finish, after which they count as timeouts.
  `send_lag_ms` reports how late the generator noticed each due request (its own
  scheduling noise: a periodic Linux timerfd wakes it at each intended time, or every
  200 us above 5,000 requests/s per process, and due requests also go out whenever a
  response wakes it; without timerfd, the event loop's 1 ms timer);
  `waited_for_connection` counts requests that then found all connections busy
  (the server's backlog, which their latency includes).

`--no-keepalive` sends `Connection: close` and opens a new connection per request.

Prints one JSON object (stdout, or `--json FILE`):
`{"requests", "errors": {connect, read, status, timeout}, "errors_total", "duration",
"rps", "latency_ms": {p50, p90, p99, p99.9, max, mean}, ...}`.  Latencies are kept in
a log-bucketed histogram (1 % resolution) that the processes merge.

    python benches/loadgen.py http://127.0.0.1:8080/2b --connections 64 --duration 10
    python benches/loadgen.py http://127.0.0.1:8080/2b --rate 5000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import multiprocessing
import os
import sys
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - the project depends on uvloop
    uvloop = None

GRACE_MAX = 2.0
MAX_WAKEUPS = 5000  # open loop: timer wake-ups per second and process, at most
RECONNECT_DELAY = 0.05

# --------------------------------------------------------------------------- histogram

_BUCKETS_PER_E = 100  # ~1 % wide buckets on a log scale
_N_BUCKETS = 2200  # up to e**22 us ~ 3.6e9 us


# The quantiles (%) a result's latency CDF is given at (`cdf_ms`; wrk's the same).
CDF_QUANTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 99.99)


class Histogram:
    """Latency histogram in microseconds, log-bucketed; mergeable as a plain list."""

    __slots__ = ("counts", "total", "sum_us", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * _N_BUCKETS
        self.total = 0
        self.sum_us = 0.0
        self.max_us = 0.0

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        idx = int(math.log(us) * _BUCKETS_PER_E) if us > 1.0 else 0
        self.counts[min(idx, _N_BUCKETS - 1)] += 1
        self.total += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    def to_dict(self) -> dict:
        return {"counts": self.counts, "total": self.total, "sum_us": self.sum_us, "max_us": self.max_us}

    def merge(self, d: dict) -> None:
        self.counts = [a + b for a, b in zip(self.counts, d["counts"], strict=False)]
        self.total += d["total"]
        self.sum_us += d["sum_us"]
        self.max_us = max(self.max_us, d["max_us"])

    def percentile_ms(self, q: float) -> float | None:
        if not self.total:
            return None
        rank = max(1, math.ceil(self.total * q / 100.0))
        seen = 0
        for idx, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                mid_us = math.exp((idx + 0.5) / _BUCKETS_PER_E) if idx else 1.0
                return round(min(mid_us, self.max_us) / 1000.0, 4)
        return round(self.max_us / 1000.0, 4)

    def cdf_ms(self) -> list[list[float]]:
        """[quantile %, latency ms] at `CDF_QUANTILES`: the latency CDF a plot draws."""
        return [[q, v] for q in CDF_QUANTILES if (v := self.percentile_ms(q)) is not None]

    def summary_ms(self) -> dict:
        out = {f"p{q:g}": self.percentile_ms(q) for q in (50, 90, 99, 99.9)}
        out["max"] = round(self.max_us / 1000.0, 4) if self.total else None
        out["mean"] = round(self.sum_us / self.total / 1000.0, 4) if self.total else None
        return out


# --------------------------------------------------------------------------- precise wake-ups


class _TimerFd:
    """A Linux timerfd (CLOCK_MONOTONIC, the clock of time.perf_counter) driven through
    ctypes, so the open loop wakes at each request's intended time with microsecond
    precision instead of the event loop's 1 ms timer granularity."""

    _CLOCK_MONOTONIC, _TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1

    class _Spec(ctypes.Structure):
        _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                    ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(self._CLOCK_MONOTONIC, self._TFD_NONBLOCK | self._TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._spec = self._Spec()
        self._ref = ctypes.byref(self._spec)

    def arm(self, first: float, interval: float) -> None:
        """Fire at perf_counter time `first`, then every `interval` seconds.  Armed once:
        re-arming per request costs a timer reprogramming each (a VM exit on a VM)."""
        sec = int(first)
        self._spec.v_sec, self._spec.v_nsec = sec, max(1, int((first - sec) * 1e9))
        self._spec.i_sec, self._spec.i_nsec = int(interval), max(1, int((interval % 1.0) * 1e9))
        self._libc.timerfd_settime(self.fd, self._TFD_TIMER_ABSTIME, self._ref, None)

    def consume(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def _timerfd() -> _TimerFd | None:
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None
    try:
        return _TimerFd()
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- one process


class _Conn(asyncio.Protocol):
    """One client connection; reports to its `_Worker`."""

    def __init__(self, worker: _Worker) -> None:
        self.w = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.closing = False
        self.sent_at = 0.0
        self.intended = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, intended: float) -> None:
        self.busy = True
        self.intended = intended
        self.sent_at = time.perf_counter()
        self.transport.write(self.w.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.w.fail(self, "read")

    def on_message_complete(self) -> None:
        self.w.on_response(self, self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.w.on_lost(self)


class _Worker:
    """The connections and request schedule of one process."""

    def __init__(self, opts: dict, conns: int, rate: float, start_wall: float) -> None:
        self.o = opts
        self.loop = asyncio.get_running_loop()
        self.n_conns = conns
        self.rate = rate
        self.open_loop = rate > 0
        self.request = opts["request"]
        self.keepalive = opts["keepalive"]
        self.start = time.perf_counter() + max(0.0, start_wall - time.time())
        self.end = self.start + opts["duration"]
        self.hist = Histogram()
        self.lag = Histogram()
        self.requests = 0
        self.errors = {"connect": 0, "read": 0, "status": 0, "timeout": 0}
        self.idle: list[_Conn] = []
        self.conns: set[_Conn] = set()
        self.pending: deque[float] = deque()  # open loop: intended send times not yet sent
        self.scheduled = 0
        self.waited = 0  # open loop: requests that found every connection busy
        self.generating = True
        self.grace_end = 0.0
        self.next_expire = 0.0
        self.done = asyncio.Event()
        self.total = int(opts["duration"] * rate)  # open loop: requests due in all
        self.timer = _timerfd() if self.open_loop else None

    # ---- lifecycle
    async def run(self) -> dict:
        for _ in range(self.n_conns):
            self.loop.create_task(self._connect())
        if self.timer is not None:
            self.loop.add_reader(self.timer.fd, self._on_timer)
            # a wake-up at every due time, or every k-th one above MAX_WAKEUPS per second
            # (requests due in between go out on the I/O events, or at the next wake-up)
            per_wake = max(1, math.ceil(self.rate / MAX_WAKEUPS))
            self.timer.arm(self.start, per_wake / self.rate)
        await asyncio.sleep(max(0.0, self.start - time.perf_counter()))
        self._tick()
        await self.done.wait()
        if self.timer is not None:
            self.loop.remove_reader(self.timer.fd)
            self.timer.close()
        for c in list(self.conns):
            if c.transport:
                c.closing = True
                c.transport.abort()
        return self._result()

    async def _connect(self) -> None:
        host, port = self.o["host"], self.o["port"]
        while self._active():
            try:
                _, conn = await self.loop.create_connection(lambda: _Conn(self), host, port)
            except OSError:
                if time.perf_counter() >= self.start:
                    self.errors["connect"] += 1
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            self.conns.add(conn)
            self._ready(conn)
            return

    def _ready(self, conn: _Conn) -> None:
        """A connection is free: give it work (or park it)."""
        now = time.perf_counter()
        self.idle.append(conn)
        if now < self.start:
            return
        if self.open_loop:
            self._dispatch(now)
        elif self.generating:
            self.idle.pop().send(now)

    def _active(self) -> bool:
        """Whether connections are still wanted (open loop: until the grace period ends)."""
        return self.generating or (self.open_loop and not self.done.is_set())

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.open_loop:
            self._dispatch(now)
        elif self.generating and self.idle:  # closed loop: start the connections parked before start
            idle, self.idle = self.idle, []
            for c in idle:
                c.send(now)
        if self.generating and now >= self.end:
            self.generating = False
            self.grace_end = now + min(self.o["timeout"], GRACE_MAX)
        if now >= self.next_expire:
            self.next_expire = now + 0.1
            self._expire(now)
        if not self.generating and (not self.open_loop or not self._outstanding() or now >= self.grace_end):
            if self.open_loop:
                self.errors["timeout"] += self._outstanding()
            self.done.set()
            return
        self.loop.call_later(0.001 if self.open_loop and self.timer is None else 0.01, self._tick)

    def _on_timer(self) -> None:
        self.timer.consume()
        self._dispatch(time.perf_counter())

    def _outstanding(self) -> int:
        return len(self.pending) + sum(1 for c in self.conns if c.busy)

    def _dispatch(self, now: float) -> None:
        """Open loop: queue every request now due, send queued ones on free connections."""
        carried = len(self.pending)  # due earlier, still waiting for a free connection
        if self.generating:
            due = min(int((now - self.start) * self.rate) + 1, self.total)
            while self.scheduled < due:
                intended = self.start + self.scheduled / self.rate
                self.lag.add(max(now - intended, 1e-7))  # how late the generator noticed it
                self.pending.append(intended)
                self.scheduled += 1
        while self.pending and self.idle:
            self.idle.pop().send(self.pending.popleft())
            if carried:
                carried -= 1
                self.waited += 1

    def _expire(self, now: float) -> None:
        limit = self.o["timeout"]
        for c in list(self.conns):
            if c.busy and now - c.sent_at > limit:
                self.fail(c, "timeout")

    # ---- events from connections
    def on_response(self, conn: _Conn, status: int) -> None:
        now = time.perf_counter()
        conn.busy = False
        if now <= self.end or self.open_loop:
            self.requests += 1
            self.hist.add(now - (conn.intended if self.open_loop else conn.sent_at))
            if status >= 400:
                self.errors["status"] += 1
        if self.keepalive and conn.parser.should_keep_alive():
            self._ready(conn)
        else:
            conn.closing = True
            conn.transport.close()
            self.conns.discard(conn)
            if self._active():
                self.loop.create_task(self._connect())

    def fail(self, conn: _Conn, kind: str) -> None:
        if conn.busy and self._active():
            self.errors[kind] += 1
        conn.busy = False
        conn.closing = True
        if conn.transport:
            conn.transport.abort()
        self._replace(conn)

    def on_lost(self, conn: _Conn) -> None:
        if conn.closing:
            return
        if conn.busy:
            self.errors["read"] += 1
        conn.busy = False
        self._replace(conn)

    def _replace(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self._active():
            self.loop.create_task(self._connect())

    def _result(self) -> dict:
        return {
            "requests": self.requests, "errors": self.errors, "hist": self.hist.to_dict(),
            "lag": self.lag.to_dict(), "scheduled": self.scheduled, "waited": self.waited,
        }


def _process_main(opts: dict, conns: int, rate: float, start_wall: float, out) -> None:
    try:  # die with the parent process even if it is killed outright
        ctypes.CDLL(None).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except (AttributeError, OSError):
        pass
    async def main() -> dict:
        return await _Worker(opts, conns, rate, start_wall).run()

    if uvloop is not None:
        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    out.send(result)
    out.close()


# --------------------------------------------------------------------------- driver


def build_request(method: str, host: str, port: int, target: str, body_size: int,
                  headers: list[str], keepalive: bool) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    lines += headers
    if body_size:
        lines += [f"Content-Length: {body_size}", "Content-Type: application/octet-stream"]
    if not keepalive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + b"x" * body_size


def run(url: str, *, connections: int = 64, duration: float = 10.0, rate: float = 0.0,
        processes: int | None = None, method: str = "GET", body_size: int = 0,
        headers: list[str] | None = None, keepalive: bool = True, timeout: float = 5.0) -> dict:
    """Runs the load and returns the merged result (see the module docstring)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    processes = max(1, min(processes, connections))
    opts = {
        "host": host, "port": port, "duration": duration, "timeout": timeout, "keepalive": keepalive,
        "request": build_request(method, host, port, target, body_size, headers or [], keepalive),
    }
    ctx = multiprocessing.get_context("fork")
    start_wall = time.time() + 0.3 + 0.02 * processes
    children = []
    for i in range(processes):
        n = connections // processes + (1 if i < connections % processes else 0)
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_process_main, args=(opts, n, rate / processes, start_wall, send), daemon=True)
        p.start()
        send.close()
        children.append((p, recv))
    results = []
    try:
        for p, recv in children:
            if recv.poll(duration + timeout + 30):
                results.append(recv.recv())
            p.join(5)
    finally:
        for p, _ in children:
            if p.is_alive():
                p.kill()
    if len(results) != processes:
        raise RuntimeError(f"{processes - len(results)} load generator process(es) returned nothing")
    return _merge(results, duration, rate, connections, processes, keepalive)


def _merge(results: list[dict], duration: float, rate: float, connections: int,
           processes: int, keepalive: bool) -> dict:
    hist, lag = Histogram(), Histogram()
    errors = {"connect": 0, "read": 0, "status": 0, "timeout": 0}
    requests = scheduled = waited = 0
    for r in results:
        hist.merge(r["hist"])
        lag.merge(r["lag"])
        requests += r["requests"]
        scheduled += r["scheduled"]
        waited += r["waited"]
        for k, v in r["errors"].items():
            errors[k] += v
    out = {
        "tool": "loadgen.py", "mode": "open" if rate > 0 else "closed", "connections": connections,
        "processes": processes, "keepalive": keepalive, "duration": duration,
        "requests": requests, "errors": errors,
        "errors_total": sum(errors.values()), "rps": round(requests / duration, 1),
        "latency_ms": hist.summary_ms(),
        "cdf_ms": hist.cdf_ms(),
        "latency_histogram": {"buckets_per_e": _BUCKETS_PER_E, **hist.to_dict()},  # log buckets of us
    }
    if rate > 0:
        out.update(rate=rate, scheduled=scheduled, waited_for_connection=waited, send_lag_ms=lag.summary_ms())
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Bundled HTTP/1.1 load generator (closed loop, or open loop with --rate).",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", help="http://host:port/path")
    p.add_argument("-c", "--connections", type=int, default=64, help="connections in total (default 64)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("-R", "--rate", type=float, default=0.0,
                   help="open loop: requests per second in total (default 0 = closed loop)")
    p.add_argument("-p", "--processes", type=int, default=None,
                   help="processes (default: the CPUs this process may run on)")
    p.add_argument("-m", "--method", default="GET")
    p.add_argument("--body-size", type=int, default=0, help="request body bytes (sent with Content-Length)")
    p.add_argument("-H", "--header", action="append", default=[], help="extra header 'Name: value' (repeatable)")
    p.add_argument("--no-keepalive", action="store_true", help="Connection: close, a new connection per request")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    p.add_argument("--json", metavar="FILE", default="-", help="write the result here (default - = stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    result = run(a.url, connections=a.connections, duration=a.duration, rate=a.rate,
                 processes=a.processes, method=a.method, body_size=a.body_size, headers=a.header,
                 keepalive=not a.no_keepalive, timeout=a.timeout)
    text = json.dumps(result, indent=2)
    if a.json == "-":
        print(text)
    else:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
