#!/usr/bin/env python3
"""Hot reload under load: a config swap every `--interval` s while HTTP
requests and open WebSockets go through the gateway; every request must be answered and
every WebSocket must stay up.

Processes (each in its own process group, pinned like benches/run.py: the gateway on
the server core(s) of `procs.cpu_plan(--workers)`; upstreams, the load process and this
controller on the other core(s)):

- two demo upstreams (`edgeplane demo-upstream --port N`), U1 and U2, and a WebSocket
  echo upstream (`benches/ws_bench.py --serve-echo PORT`);
- the gateway, `edgeplane serve -c live.yaml`, on config A;
- the load process (this file, `_load`): asyncio raw sockets, uvloop.
  - HTTP, closed loop on the shared proxy route (`--keepalive` connections that each
    send `GET /api/hello`, wait for its answer, `--think` ms, and the next; `--fresh`
    clients that open a new connection per request, `Connection: close`; and
    `--body-clients` kept-alive POST clients whose 64-byte body arrives in two halves
    `--body-gap` ms apart, so that at most swaps a request has been routed and is still
    reading its body). The demo upstream echoes the request, so every answer says which
    upstream (U1 or U2) served it.
  - a route probe: one kept-alive connection alternating `GET /only-a` and
    `GET /only-b` (a route in A only, a route in B only; 404 from the other config is
    expected), every 10 ms;
  - `--websockets` WebSockets through `GET /ws` (proxied to the echo upstream), each
    sending a numbered text message every `--ws-every` ms (not waiting for the echo)
    and checking the echoes arrive in order; plus one churn client that keeps opening a
    WebSocket, doing one echo and closing it (handshakes during reloads).

Configs A and B (`live.yaml` is overwritten atomically, temp + rename): the shared route
`ANY /api/{proxy+}` (integration timeout `--route-timeout`, 3s, so a stuck request is
answered 504 within the client's 5 s) keeps its key but its upstream `app` points at U1
in A and at U2 in B (a changed upstream: a new pool, the old one drains), its throttle
rate is 1,000,000/s in A and 2,000,000/s in B (never refuses), `GET /only-a` exists in A
only and `GET /only-b` in B only, and `GET /ws` goes to the unchanged upstream `echo`
(`--ws-upstream-change` makes `echo` differ too, so the pool the open WebSockets came
from is retired at every reload). `--vary` picks a subset of routes,targets,throttle to
differ; `--no-throttle` leaves the throttle out (with `workers > 1`: no shared-memory
limit tables). Both: `admin: {listen: 127.0.0.1:PORT, insecure: true}`, `access_log:
off`.

Phases, after a warm-up: **baseline** (`--duration` s, no reload), then **reload**
(`--duration` s; every `--interval` s, the first and the last half an interval from the
edges, the other config is written and a reload is triggered). Trigger (`--trigger`):
- `admin`: `POST /config/reload` on the admin listener; with one worker its answer
  (200 with the reload's report) says the swap is done; with N workers the worker that
  took the call passes it to the supervisor, and `/stats` is polled as for SIGHUP;
- `sighup`: SIGHUP to the gateway's pid (the supervisor with `--workers N`), then
  `/stats` is polled until `reloads.ok` counts it. Before any SIGHUP is sent, the
  controller reads the signal mask of the pid (`SigCgt` in /proc/PID/status): a process
  that does not catch SIGHUP would die of it (the default action), so the run refuses
  and says SIGHUP is not wired;
- `takeover`: SIGUSR2 to the serving instance (the supervisor with `--workers N`), which
  starts `serve --takeover` with its own command line; the reload is confirmed when the
  pidfile names the successor (it writes it once it serves). Every takeover alternates
  the config as the other triggers do (the successor reads the file). The old instance
  keeps the WebSockets it holds until they close (`drain_timeout` is set past the end
  of the run), so answers it gives on its kept-alive connections after the hand-over
  are expected, not stale: they are counted, not required to be zero. Use an interval
  of a few seconds (a successor starts a Python process, and its workers).
- `auto` (default): `sighup` if the pid catches SIGHUP, else `admin` (noted).
Every reload is checked: one that is not counted within 5 s ends the reload phase, and
the run reports it (e.g. a supervisor that catches SIGHUP but does not reload yet).

Figures per phase: HTTP answers, req/s, failed requests (connection errors, resets,
timeouts, 5xx: must be 0), non-2xx answers, p50/p99/max latency (keep-alive and fresh
connection apart) and the ratio to the baseline; stale answers (a request sent after a
reload was confirmed but served by the previous config's upstream, or a route probe
answered by the previous config's routes: must be 0 — the "next request, even on a
kept-alive connection, uses the new snapshot" rule); WebSocket messages sent, echoed and
lost, echo p50/p99, dropped or unclean closes (must be 0), churn handshakes; the
gateway's CPU-seconds and RSS; reload count and the time of one reload (the gateway's
own figures: `/stats` `reloads.last.seconds` or the admin answer's `seconds`, which
time the build and swap only, and the "reloaded config ... in N ms" log lines, which
also time reading and validating the file; the admin call's latency; the time from the
trigger until every worker's `/stats` counted it). "other CPU s" is the machine's busy
time not spent by this bench's processes: someone else's load, which makes the
latencies noisy. Every failure is listed with its time relative to the nearest
reload (trigger and confirmation), so a failure can be tied to the swap.

    .venv/bin/python benches/reload_under_load.py --duration 5                 # small
    .venv/bin/python benches/reload_under_load.py --duration 30 --interval 0.5 --trigger admin
    .venv/bin/python benches/reload_under_load.py --workers 2 --trigger sighup
    .venv/bin/python benches/reload_under_load.py --workers 2 --trigger takeover --interval 3

Exit status: 0 when every must-be-zero figure is zero, 1 when one is not (or the run
failed), 2 when the asked trigger cannot be used, 130 on Ctrl-C; every child is stopped
either way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from procs import (  # noqa: E402
    CLK_TCK,
    Procs,
    cpu_plan,
    cpu_seconds,
    edgeplane_argv,
    free_port,
    guarded,
    rss_bytes,
    wait_http,
    wait_line,
    write_json,
)
from report import table as _table  # noqa: E402
from slow_clients import core_ticks  # noqa: E402
from ws_bench import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_key, client_frame  # noqa: E402

MIB = 1024 * 1024
HTTP_PATH = "/api/hello"
WS_PATH = "/ws"
BODY_BYTES = 64
PROBE_EVERY = 0.010
CHURN_EVERY = 0.050
TIMEOUT = 5.0  # one HTTP request, one handshake, one close
RELOAD_CONFIRM_TIMEOUT = 5.0
TAKEOVER_TIMEOUT = 30.0  # SIGUSR2 until the successor names itself in the pidfile
THROTTLE = {"A": 1_000_000, "B": 2_000_000}


# =========================================================================== load process


class Load:
    """What the load process records: raw per-request / per-message rows with wall-clock
    send times (the controller cuts them into phases), and every failure in detail."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.loop = asyncio.get_running_loop()
        self.stop = False
        self.tags = {f'"host":"127.0.0.1:{p}"'.encode(): i + 1 for i, p in enumerate(a.upstream_ports)}
        self.http: list[tuple] = []  # (t_send wall, latency s, status, kind, upstream 1/2/0)
        self.probe: list[tuple] = []  # (t_send wall, latency s, status, path)
        self.failures: list[dict] = []  # HTTP failures: errors and 5xx
        self.ws_msgs: list[tuple] = []  # (t_send wall, rtt s)
        self.ws_events: list[dict] = []  # drops, unclean closes, server closes, gaps
        self.ws: list[WsConn] = []
        self.churn = {"ok": 0, "failed": 0}

    def fail(self, **row) -> None:
        row.setdefault("t", time.time())
        self.failures.append(row)


class _Resp:
    __slots__ = ("done", "body", "parser", "keep")

    def __init__(self) -> None:
        self.done = False
        self.body = bytearray()
        self.parser = None
        self.keep = False

    def on_headers_complete(self) -> None:
        # Asked here: after on_message_complete httptools answers False for any response.
        self.keep = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


class Cut(Exception):
    """The connection ended (reset or EOF) before a whole response arrived."""

    def __init__(self, got: int, exc: BaseException | None) -> None:
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "EOF"
        super().__init__(f"{what} after {got} response bytes")
        self.got = got


async def _connect(loop, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _exchange(loop, sock: socket.socket, request: bytes, rest: bytes = b"",
                    gap: float = 0.0) -> tuple[int, bytes, bool]:
    """(status, body, keep-alive) of one request on `sock`; `rest` (the end of the body)
    is sent `gap` s after `request`."""
    import httptools

    try:
        await loop.sock_sendall(sock, request)
        if rest:
            await asyncio.sleep(gap)
            await loop.sock_sendall(sock, rest)
    except OSError as exc:
        raise Cut(0, exc) from None
    cb = _Resp()
    parser = cb.parser = httptools.HttpResponseParser(cb)
    got = 0
    while not cb.done:
        try:
            data = await loop.sock_recv(sock, 65536)
        except OSError as exc:
            raise Cut(got, exc) from None
        if not data:
            raise Cut(got, None)
        got += len(data)
        parser.feed_data(data)
    return parser.get_status_code(), bytes(cb.body), cb.keep


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, Cut):
        return "cut_mid_response" if exc.got else "closed_before_response"
    return type(exc).__name__


async def http_client(ld: Load, name: str, kind: str) -> None:
    """Closed loop on the shared route: one kept-alive connection (reconnecting after an
    error), a new connection per request (`fresh`), or (`body`) a kept-alive connection
    sending POSTs whose body comes in two halves `--body-gap` ms apart."""
    loop, a = ld.loop, ld.a
    fresh = kind == "fresh"
    close = b"Connection: close\r\n" if fresh else b""
    rest, gap = b"", 0.0
    if kind == "body":
        body = b"x" * BODY_BYTES
        req = (f"POST {HTTP_PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: text/plain\r\n"
               f"Content-Length: {BODY_BYTES}\r\n\r\n").encode() + body[:BODY_BYTES // 2]
        rest, gap = body[BODY_BYTES // 2:], a.body_gap / 1e3
    else:
        req = f"GET {HTTP_PATH} HTTP/1.1\r\nHost: bench\r\n".encode() + close + b"\r\n"
    sock, on_conn = None, 0
    while not ld.stop:
        t_wall, t0 = time.time(), time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT):
                if sock is None:
                    sock, on_conn = await _connect(loop, a.port), 0
                on_conn += 1
                status, body, keep = await _exchange(loop, sock, req, rest, gap)
            dt = time.perf_counter() - t0
        except (OSError, Cut, TimeoutError) as exc:
            ld.fail(t=t_wall, client=name, kind=_kind(exc), error=str(exc) or type(exc).__name__,
                    request_on_connection=on_conn, after_ms=round((time.perf_counter() - t0) * 1e3, 2))
            if sock is not None:
                sock.close()
                sock = None
            await asyncio.sleep(0.01)
            continue
        up = 0
        for tag, i in ld.tags.items():
            if tag in body:
                up = i
                break
        ld.http.append((t_wall, dt, status, kind, up))
        if status >= 500:
            ld.fail(t=t_wall, client=name, kind=f"status_{status}", error=body[:300].decode("latin-1"),
                    request_on_connection=on_conn, after_ms=round(dt * 1e3, 2))
        if fresh or not keep:
            sock.close()
            sock = None
        if a.think:
            await asyncio.sleep(a.think / 1e3)
    if sock is not None:
        sock.close()


async def probe_client(ld: Load) -> None:
    """One kept-alive connection alternating the A-only and the B-only route."""
    loop, a = ld.loop, ld.a
    sock, on_conn, n = None, 0, 0
    while not ld.stop:
        path = "/only-a" if n % 2 == 0 else "/only-b"
        n += 1
        req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        t_wall, t0 = time.time(), time.perf_counter()
        try:
            async with asyncio.timeout(TIMEOUT):
                if sock is None:
                    sock, on_conn = await _connect(loop, a.port), 0
                on_conn += 1
                status, body, keep = await _exchange(loop, sock, req)
        except (OSError, Cut, TimeoutError) as exc:
            ld.fail(t=t_wall, client="probe", kind=_kind(exc), error=str(exc) or type(exc).__name__,
                    path=path, request_on_connection=on_conn)
            if sock is not None:
                sock.close()
                sock = None
            await asyncio.sleep(0.01)
            continue
        ld.probe.append((t_wall, time.perf_counter() - t0, status, path))
        if status >= 500:
            ld.fail(t=t_wall, client="probe", kind=f"status_{status}", error=body[:300].decode("latin-1"),
                    path=path, request_on_connection=on_conn)
        if not keep:
            sock.close()
            sock = None
        await asyncio.sleep(PROBE_EVERY)
    if sock is not None:
        sock.close()


class WsConn(asyncio.Protocol):
    """A client WebSocket that sends `<index>:<seq>` every `every` s and checks that the
    echoes come back in order. `close()` starts the closing handshake (1000)."""

    def __init__(self, ld: Load, index: int, every: float | None, record: bool = True) -> None:
        self.ld, self.index, self.every, self.record = ld, index, every, record
        self.loop = ld.loop
        self.key = base64.b64encode(os.urandom(16))
        self.mkey = os.urandom(4)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.opened = self.loop.create_future()
        self.lost = self.loop.create_future()
        self.echo_waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.seq = 0  # next to send
        self.expect = 0  # next echo expected
        self.sent: dict[int, tuple[float, float]] = {}  # seq -> (wall, perf)
        self.echoed = 0
        self.missing = 0  # echoes skipped (a later one arrived first)
        self.close_sent = False
        self.close_code: int | None = None  # from the server's close frame
        self.state = "connecting"  # open, closing, closed, dropped

    def event(self, what: str, **kw) -> None:
        if self.record:
            self.ld.ws_events.append({"t": time.time(), "ws": self.index, "event": what,
                                      "sent": self.seq, "echoed": self.echoed, **kw})

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(
            f"GET {WS_PATH} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ".encode() + self.key + b"\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            lines = head.split(b"\r\n")
            accept = b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-accept":
                    accept = value.strip()
            if not lines[0].startswith(b"HTTP/1.1 101") or accept != accept_key(self.key):
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(
                        f"handshake answered {lines[0][:80].decode(errors='replace')!r}"))
                self.transport.abort()
                return
            self.upgraded = True
            self.state = "open"
            self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buf, pos, size = self.buf, 0, len(self.buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, p = b1 & 0x7F, pos + 2
            if n == 126:
                if size - p < 2:
                    break
                n, p = int.from_bytes(buf[p:p + 2], "big"), p + 2
            elif n == 127:
                if size - p < 8:
                    break
                n, p = int.from_bytes(buf[p:p + 8], "big"), p + 8
            if size - p < n:
                break
            payload, pos = bytes(buf[p:p + n]), p + n
            op = b0 & 0x0F
            if op == OP_TEXT:
                self._echo(payload)
            elif op == OP_PING:
                self.transport.write(client_frame(OP_PONG, payload, self.mkey))
            elif op == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.close_sent:  # the server started it: unclean for this bench
                    self.event("server_close", code=self.close_code, reason=payload[2:80].decode(errors="replace"))
                    self.close_sent = True
                    self.transport.write(client_frame(OP_CLOSE, payload[:2], self.mkey))
                self.state = "closing"
            else:
                self.event("unexpected_frame", opcode=op)
        if pos:
            del buf[:pos]

    def _echo(self, payload: bytes) -> None:
        try:
            seq = int(payload.split(b":")[1])
        except (IndexError, ValueError):
            self.event("bad_echo", payload=payload[:60].decode(errors="replace"))
            return
        sent = self.sent.pop(seq, None)
        if sent is None:
            self.event("duplicate_echo", seq=seq)
            return
        if seq != self.expect:
            self.missing += seq - self.expect
            self.event("echo_gap", expected=self.expect, got=seq)
        self.expect = seq + 1
        self.echoed += 1
        if self.record:
            self.ld.ws_msgs.append((sent[0], time.perf_counter() - sent[1]))
        if self.echo_waiter is not None and not self.echo_waiter.done():
            self.echo_waiter.set_result(None)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost during the handshake ({exc!r})"))
        if self.echo_waiter is not None and not self.echo_waiter.done():
            self.echo_waiter.set_exception(ConnectionError(f"connection lost before the echo ({exc!r})"))
        if self.state == "open":  # nobody closed: dropped
            self.state = "dropped"
            self.event("dropped", error=repr(exc))
        elif self.close_code is None and self.upgraded:  # our close got no close frame back
            self.state = "unclean"
            self.event("closed_without_close_frame", error=repr(exc))
        else:
            self.state = "closed"
        if not self.lost.done():
            self.lost.set_result(None)

    # -- sending
    def start(self, offset: float) -> None:
        self.timer = self.loop.call_later(offset, self.tick)

    def tick(self) -> None:
        if self.state != "open" or self.close_sent:
            return
        self.send()
        self.timer = self.loop.call_later(self.every, self.tick)

    def send(self) -> None:
        seq = self.seq
        self.seq += 1
        self.sent[seq] = (time.time(), time.perf_counter())
        self.transport.write(client_frame(OP_TEXT, f"{self.index}:{seq}".encode(), self.mkey))

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is None or self.transport.is_closing() or self.close_sent:
            return
        self.close_sent = True
        self.state = "closing"
        self.transport.write(client_frame(OP_CLOSE, struct.pack("!H", 1000), self.mkey))


async def open_ws(ld: Load, index: int, every: float | None, record: bool = True) -> WsConn:
    _, ws = await asyncio.wait_for(ld.loop.create_connection(
        lambda: WsConn(ld, index, every, record), "127.0.0.1", ld.a.port), TIMEOUT)
    try:
        await asyncio.wait_for(asyncio.shield(ws.opened), TIMEOUT)
    except BaseException:
        ws.transport.abort()
        raise
    return ws


async def churn_client(ld: Load) -> None:
    """Opens a WebSocket, does one echo, closes it cleanly; again, until stopped."""
    n = 0
    while not ld.stop:
        n += 1
        t_wall, ws = time.time(), None
        try:
            ws = await open_ws(ld, -n, None, record=False)
            ws.echo_waiter = ld.loop.create_future()
            ws.send()
            await asyncio.wait_for(ws.echo_waiter, TIMEOUT)
            ws.close()
            await asyncio.wait_for(asyncio.shield(ws.lost), TIMEOUT)
            if ws.state != "closed" or ws.close_code != 1000:
                raise ConnectionError(f"close: state {ws.state}, code {ws.close_code}")
            ld.churn["ok"] += 1
        except (OSError, TimeoutError, ConnectionError) as exc:
            ld.churn["failed"] += 1
            ld.ws_events.append({"t": t_wall, "ws": "churn", "event": "churn_failed",
                                 "error": f"{type(exc).__name__}: {exc}"})
            if ws is not None and ws.transport is not None:
                ws.transport.abort()
        await asyncio.sleep(CHURN_EVERY)


def load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reload_under_load.py _load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-ports", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--keepalive", type=int, default=4)
    p.add_argument("--fresh", type=int, default=2)
    p.add_argument("--think", type=float, default=1.0)
    p.add_argument("--body-clients", type=int, default=1)
    p.add_argument("--body-gap", type=float, default=20.0)
    p.add_argument("--websockets", type=int, default=200)
    p.add_argument("--ws-every", type=float, default=100.0)
    p.add_argument("--no-churn", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    async def run() -> dict:
        ld = Load(a)
        done = asyncio.Event()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            ld.loop.add_signal_handler(sig, done.set)
        every = a.ws_every / 1e3
        for start in range(0, a.websockets, 100):
            ld.ws += await asyncio.gather(*(open_ws(ld, i, every)
                                            for i in range(start, min(a.websockets, start + 100))))
        for i, ws in enumerate(ld.ws):
            ws.start(every * i / max(1, len(ld.ws)))
        tasks = [asyncio.create_task(http_client(ld, f"keepalive-{i}", "keepalive")) for i in range(a.keepalive)]
        tasks += [asyncio.create_task(http_client(ld, f"fresh-{i}", "fresh")) for i in range(a.fresh)]
        tasks += [asyncio.create_task(http_client(ld, f"body-{i}", "body")) for i in range(a.body_clients)]
        tasks.append(asyncio.create_task(probe_client(ld)))
        if not a.no_churn:
            tasks.append(asyncio.create_task(churn_client(ld)))
        print(f"ready: {len(ld.ws)} WebSockets open", flush=True)
        await done.wait()
        t_stop = time.time()
        ld.stop = True
        for ws in ld.ws:
            if ws.timer is not None:
                ws.timer.cancel()
        await asyncio.wait(tasks, timeout=TIMEOUT + 1)
        deadline = time.monotonic() + 2.0  # echoes still on their way
        while time.monotonic() < deadline and any(ws.sent and ws.state == "open" for ws in ld.ws):
            await asyncio.sleep(0.05)
        for ws in ld.ws:
            ws.close()
        pending = [ws.lost for ws in ld.ws if not ws.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=TIMEOUT)
        close_timeouts = 0
        for ws in ld.ws:
            if not ws.lost.done():
                close_timeouts += 1
                ws.event("close_timeout")
                ws.transport.abort()
        await asyncio.sleep(0)
        states: dict[str, int] = {}
        for ws in ld.ws:
            states[ws.state] = states.get(ws.state, 0) + 1
        return {
            "t_stop": t_stop,
            "http": ld.http, "probe": ld.probe, "failures": ld.failures,
            "ws": {"opened": len(ld.ws), "states": states, "close_timeouts": close_timeouts,
                   "clean_closes": sum(1 for ws in ld.ws if ws.state == "closed" and ws.close_code == 1000),
                   "sent": sum(ws.seq for ws in ld.ws), "echoed": sum(ws.echoed for ws in ld.ws),
                   "unanswered": sum(len(ws.sent) for ws in ld.ws),
                   "unanswered_sent_at": sorted(t for ws in ld.ws for t, _ in ws.sent.values()),
                   "churn": ld.churn},
            "ws_msgs": ld.ws_msgs, "ws_events": ld.ws_events,
        }

    out = uvloop.run(run())
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, a.out)
    print("done", flush=True)
    return 0


# =========================================================================== controller




def gateway_config(which: str, a: argparse.Namespace, port: int, admin: int, ups: list[int],
                   echo_port: int) -> dict:
    """Config A or B (module docstring: what differs)."""
    echo_pool = {"max_connections": 4096, "max_waiters": 4096}
    if a.ws_upstream_change and which == "B":
        echo_pool["idle_timeout"] = "61s"  # a changed upstream: retired at every reload
    b = which == "B"
    only = "/only-b" if b and "routes" in a.vary else "/only-a"
    rate = 0 if a.no_throttle else THROTTLE["B" if b and "throttle" in a.vary else "A"]
    return {
        "listen": [f"127.0.0.1:{port}"],
        "workers": a.workers,
        # takeover: old instances keep their WebSockets until the run ends
        **({"drain_timeout": f"{int(2 * a.duration + a.warmup + 60)}s"} if a.trigger == "takeover" else {}),
        "log_level": "info",
        "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},
        "access_log": {"destination": "off"},
        "upstreams": {
            "app": {"targets": [f"http://127.0.0.1:{ups[1] if b and 'targets' in a.vary else ups[0]}"]},
            "echo": {"targets": [f"http://127.0.0.1:{echo_port}"], "pool": echo_pool},
        },
        "routes": [
            {"route": "ANY /api/{proxy+}",
             "integration": {"type": "http", "upstream": "app", "timeout": a.route_timeout},
             **({"throttle": {"rate": rate, "burst": rate}} if rate else {})},
            {"route": f"GET {WS_PATH}", "integration": {"type": "http", "upstream": "echo",
                                                         "timeout": a.route_timeout}},
            {"route": f"GET {only}", "integration": {"type": "mock", "body": which.lower(),
                                                     "content_type": "text/plain"}},
        ],
    }


def http_call(port: int, method: str, path: str, timeout: float = 10.0) -> tuple[int | None, dict | str | None, float]:
    """(status, JSON or text answer, seconds); status None on a connection error."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0
    try:
        data: dict | str = json.loads(body)
    except ValueError:
        data = body.decode(errors="replace")
    return resp.status, data, time.perf_counter() - t0


def catches(pid: int, sig: int, field: str = "SigCgt:") -> bool | None:
    """Whether `pid` has a handler for `sig` (SigCgt in /proc/PID/status; `field`
    "SigIgn:": whether it ignores it); None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        return None
    return None




class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(a.workers, pin=not a.no_pin)
        self.notes: list[str] = []
        self.trigger = a.trigger
        self.helpers: dict[str, subprocess.Popen] = {}  # upstreams
        self.instances: list[int] = []  # takeover: every gateway instance's pid, oldest first
        self.cpu_seen: dict[int, float] = {}  # takeover: last CPU-seconds seen per instance

    def gateway_cpu(self) -> float:
        """CPU-seconds of every gateway instance so far. Successors are not descendants of
        the first instance (each starts its own session), so each is sampled on its own;
        an instance that exited counts with its last sample (taken at every takeover)."""
        for pid in self.instances:
            now = cpu_seconds(pid)
            self.cpu_seen[pid] = max(self.cpu_seen.get(pid, 0.0), now)
        return sum(self.cpu_seen.values())

    def cpu(self, pids: dict[str, int]) -> dict[str, float]:
        """CPU-seconds of each process tree, this controller's, and the machine's busy
        seconds (every core, /proc/stat): the rest is someone else's load."""
        out = {k: cpu_seconds(v) for k, v in pids.items() if k != "gateway" or not self.instances}
        if self.instances:
            out["gateway"] = self.gateway_cpu()
        out["controller"] = sum(os.times()[:2])
        out["machine"] = sum(busy for busy, _ in core_ticks().values()) / CLK_TCK
        return out

    def start(self, name: str, argv: list[str], cores, port: int, path: str) -> subprocess.Popen:
        proc = self.helpers[name] = self.procs.start_ready(name, argv, cores, port, path)
        return proc

    def write_config(self, which: str) -> None:
        """Atomically: the other config's file is written beside, then renamed over."""
        tmp = self.live.with_suffix(".tmp")
        shutil.copyfile(self.cfg_files[which], tmp)
        os.replace(tmp, self.live)

    # ------------------------------------------------------------------ stats
    def worker_stats(self) -> dict[int, dict]:
        """/stats of every worker, each as that worker answered it itself: with N workers
        each admin connection lands on one of them (SO_REUSEPORT), so ask until every
        one answered (or 40 tries)."""
        out: dict[int, dict] = {}
        for _ in range(1 if self.a.workers == 1 else 40):
            # /stats merges every worker (the others' as of their last second); the
            # answering worker's own entry is fresh, so each connection reads one worker.
            status, data, _ = http_call(self.admin, "GET", "/stats?per_worker=1", timeout=5)
            if status == 200 and isinstance(data, dict):
                own = next((w for w in data.get("per_worker") or [] if w.get("pid") == data.get("pid")), data)
                out[data.get("pid", 0)] = own
            if len(out) >= self.a.workers:
                break
        return out

    def log_size(self) -> int:
        try:
            return (self.workdir / "gateway.log").stat().st_size
        except OSError:
            return 0

    def log_errors_since(self, offset: int) -> list[str]:
        """ERROR lines (with their indented continuation lines) the gateway logged after `offset`."""
        try:
            with open(self.workdir / "gateway.log", "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        out, keep = [], False
        for ln in text.splitlines():
            if " ERROR " in ln or "Traceback" in ln:
                keep = True
                out.append(ln)
            elif keep and ln.startswith((" ", "\t")):
                out.append(ln)
            else:
                keep = False
        return out[:20]

    # ------------------------------------------------------------------ triggers
    def current_pid(self) -> int:
        return self.instances[-1] if self.instances else self.gw.pid

    def gateway_gone(self) -> str | None:
        """Why the serving gateway is gone, or None while it serves."""
        if self.trigger != "takeover":
            return None if self.gw.poll() is None else f"the gateway exited with {self.gw.returncode}"
        return None if os.path.exists(f"/proc/{self.current_pid()}") else f"gateway pid {self.current_pid()} is gone"

    def stop_instances(self) -> None:
        """Takeover: SIGTERM every instance still running (each leads its own process
        group), wait for them to drain, SIGKILL what is left."""
        for pid in self.instances[1:]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in self.instances[1:]):
            time.sleep(0.05)
        for pid in self.instances[1:]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def choose_trigger(self) -> None:
        if self.trigger == "takeover":
            caught = catches(self.gw.pid, signal.SIGUSR2)
            msg = f"SIGUSR2: the gateway (pid {self.gw.pid}) {'catches' if caught else 'does not catch'} it"
            print(msg, flush=True)
            self.notes.append(msg)
            if not caught:
                raise TriggerUnavailable(msg)
            self.instances = [self.gw.pid]
            return
        caught = catches(self.gw.pid, signal.SIGHUP)
        ignored = catches(self.gw.pid, signal.SIGHUP, "SigIgn:")
        who = "the supervisor" if self.a.workers > 1 else "the gateway"
        if caught:
            msg = f"SIGHUP: {who} (pid {self.gw.pid}) catches it"
        elif ignored:
            msg = f"SIGHUP is not wired: {who} (pid {self.gw.pid}) ignores it (SigIgn); not sent"
        else:
            msg = (f"SIGHUP is not wired: {who} (pid {self.gw.pid}) has no handler for it "
                   f"(SigCgt), so SIGHUP would kill it (default action); not sent")
        print(msg, flush=True)
        self.notes.append(msg)
        if self.trigger == "auto":
            self.trigger = "sighup" if caught else "admin"
            self.notes.append(f"trigger: {self.trigger} (auto)")
        elif self.trigger == "sighup" and not caught:
            raise TriggerUnavailable(msg)

    def reload(self, which: str, before: dict[int, dict]) -> dict:
        """Writes config `which` and triggers one reload; returns its record once every
        worker counted it in /stats (or the admin call answered what it did, one worker)."""
        self.write_config(which)
        log_at = self.log_size()
        t_trigger = time.time()
        rec: dict = {"to": which, "t_trigger": t_trigger}
        if self.trigger == "takeover":
            return self.takeover(rec, log_at)
        if self.trigger == "admin":
            status, data, took = http_call(self.admin, "POST", "/config/reload")
            rec.update(call_ms=round(took * 1e3, 2), status=status)
            if status != 200:
                rec.update(ok=False, t_done=time.time(), answer=data)
                return rec
            if self.a.workers == 1 and isinstance(data, dict) and "seconds" in data:
                # One process answers once the swap is done, with what the reload did.
                rec.update(ok=True, t_done=time.time(), seconds=data.get("seconds"), hash=data.get("hash"),
                           answer={k: data.get(k) for k in ("routes", "upstreams_kept", "upstreams_new",
                                                           "upstreams_retired")})
                return rec
            rec["admin_answer"] = data  # e.g. a worker that passed it on to its supervisor
        else:
            os.kill(self.gw.pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_CONFIRM_TIMEOUT
        seen: dict[int, dict] = {}
        while time.monotonic() < deadline:
            for pid, s in self.worker_stats().items():
                r = s.get("reloads") or {}
                b = (before.get(pid) or {}).get("reloads") or {"ok": 0, "failed": 0}
                if r.get("ok", 0) > b.get("ok", 0) or r.get("failed", 0) > b.get("failed", 0):
                    seen[pid] = r
            if len(seen) >= self.a.workers:
                break
            if self.gw.poll() is not None:
                rec.update(ok=False, t_done=time.time(),
                           answer=f"the gateway exited with {self.gw.returncode} after the {self.trigger} trigger")
                return rec
            time.sleep(0.005)
        rec["t_done"] = time.time()
        rec["confirm_ms"] = round((rec["t_done"] - t_trigger) * 1e3, 2)
        if len(seen) < self.a.workers:
            rec.update(ok=False, answer=f"{self.trigger} trigger sent; {len(seen)} of {self.a.workers} worker(s) "
                                        f"counted a reload in /stats within {RELOAD_CONFIRM_TIMEOUT:.0f}s",
                       gateway_log=self.log_errors_since(log_at))
            return rec
        lasts = [r.get("last") or {} for r in seen.values()]
        rec["ok"] = all(x.get("ok") for x in lasts)
        rec["seconds"] = max((x.get("seconds") or 0) for x in lasts)
        rec["hash"] = lasts[0].get("hash")
        rec["t_done"] = max(x.get("at") or rec["t_done"] for x in lasts)  # the gateway's own clock
        if not rec["ok"]:
            rec["answer"] = [x.get("errors") for x in lasts]
        return rec

    def takeover(self, rec: dict, log_at: int) -> dict:
        """SIGUSR2 to the serving instance; done when the pidfile names its successor."""
        old = self.current_pid()
        self.gateway_cpu()  # the old instance's CPU so far: it exits once drained
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + TAKEOVER_TIMEOUT
        while time.monotonic() < deadline:
            try:
                pid = int(self.pidfile.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != old:
                self.instances.append(pid)
                rec.update(ok=True, t_done=time.time(), pid=pid)
                rec["confirm_ms"] = round((rec["t_done"] - rec["t_trigger"]) * 1e3, 2)
                return rec
            time.sleep(0.01)
        rec.update(ok=False, t_done=time.time(), gateway_log=self.log_errors_since(log_at),
                   answer=f"SIGUSR2 sent to pid {old}; no successor named in the pidfile within "
                          f"{TAKEOVER_TIMEOUT:.0f}s")
        return rec

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        a = self.a
        load_cores = self.plan.load
        print(f"pinning: {self.plan.note}", flush=True)
        ups = []
        for i in (1, 2):
            port = free_port()
            self.start(f"upstream{i}", edgeplane_argv() + ["demo-upstream", "--port", str(port)],
                       load_cores, port, "/2b")
            ups.append(port)
        echo_port = free_port()
        self.start("ws-echo", [sys.executable, str(BENCH_DIR / "ws_bench.py"), "--serve-echo", str(echo_port)],
                   load_cores, echo_port, "/")
        self.port, self.admin = free_port(), free_port()
        self.cfg_files = {}
        for which in ("A", "B"):
            path = self.workdir / f"config-{which}.yaml"
            path.write_text(json.dumps(gateway_config(which, a, self.port, self.admin, ups, echo_port),
                                       indent=2) + "\n")  # JSON is YAML
            check = subprocess.run(edgeplane_argv() + ["validate", "-c", str(path)],
                                   capture_output=True, text=True, timeout=60)
            if check.returncode != 0:
                raise RuntimeError(f"edgeplane validate refused {path}:\n{check.stdout}{check.stderr}")
            self.cfg_files[which] = path
        self.live = self.workdir / "live.yaml"
        self.write_config("A")
        self.pidfile = self.workdir / "gateway.pid"
        self.gw = self.procs.start("gateway", edgeplane_argv() + ["serve", "-c", str(self.live), "--pidfile",
                                                                  str(self.pidfile)], self.plan.server)
        try:
            wait_http(self.admin, "/healthz", self.gw)
            wait_http(self.port, "/only-a", self.gw)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway did not start: {exc}\n{self.procs.log_tail('gateway')}") from None
        self.choose_trigger()
        print(f"trigger: {self.trigger}", flush=True)

        out_path = self.workdir / "load.json"
        load = self.procs.start(
            "load", [sys.executable, __file__, "_load", "--port", str(self.port),
                     "--upstream-ports", ",".join(map(str, ups)), "--keepalive", str(a.keepalive),
                     "--fresh", str(a.fresh), "--think", str(a.think),
                     "--body-clients", str(a.body_clients), "--body-gap", str(a.body_gap),
                     "--websockets", str(a.websockets), "--ws-every", str(a.ws_every),
                     "--out", str(out_path)] + (["--no-churn"] if a.no_churn else []),
            load_cores)
        wait_line(self.workdir / "load.log", "ready", load, 60)
        time.sleep(a.warmup)
        rss0 = sum(rss_bytes(self.gw.pid).values())
        stats0 = self.worker_stats()

        # ---- baseline
        print(f"baseline: {a.duration:g} s without reloads ...", flush=True)
        pids = {"gateway": self.gw.pid, "load": load.pid, **{n: p.pid for n, p in self.helpers.items()}}
        b0, cpu_b0 = time.time(), self.cpu(pids)
        time.sleep(a.duration)
        b1, cpu_b1 = time.time(), self.cpu(pids)

        # ---- reloads
        print(f"reload: {a.duration:g} s, a reload every {a.interval:g} s ({self.trigger}) ...", flush=True)
        reloads: list[dict] = []
        stopped_early = None
        current = "A"
        # /stats reload counters per worker pid, as of the last confirmed reload
        before = {pid: {"reloads": dict(s.get("reloads") or {})} for pid, s in stats0.items()}
        r0, cpu_r0 = time.time(), self.cpu(pids)
        t_start = time.monotonic()
        k = 0
        while True:
            # Half an interval from either edge of the phase: a request in flight at a
            # swap was sent in this phase, and none of the baseline's was.
            due = t_start + (k + 0.5) * a.interval
            now = time.monotonic()
            if due >= t_start + a.duration:
                break
            if due > now:
                time.sleep(due - now)
            elif k and now - due > a.interval:  # a reload took longer than the interval: skip ahead
                k = math.ceil((now - t_start) / a.interval)
                continue
            k += 1
            current = "B" if current == "A" else "A"
            rec = self.reload(current, before)
            reloads.append(rec)
            if not rec.get("ok"):
                stopped_early = f"reload {len(reloads)} ({self.trigger}) did not succeed: {rec.get('answer')}"
                if rec.get("gateway_log"):
                    stopped_early += "; the gateway logged:\n    " + "\n    ".join(rec["gateway_log"])
                print(f"  {stopped_early}", flush=True)
                break
            for b in before.values():
                b["reloads"]["ok"] = b["reloads"].get("ok", 0) + 1
            stopped_early = self.gateway_gone()
            if stopped_early is not None:
                break
        remaining = t_start + a.duration - time.monotonic()
        if remaining > 0 and stopped_early is None:
            time.sleep(remaining)
        r1, cpu_r1 = time.time(), self.cpu(pids)
        rss1 = sum(rss_bytes(self.current_pid()).values())
        serving = self.gateway_gone() is None
        stats1 = self.worker_stats() if serving else {}
        upstreams = http_call(self.admin, "GET", "/upstreams")[1] if serving else None

        # ---- stop the load, collect
        os.kill(load.pid, signal.SIGUSR1)
        try:
            load.wait(TIMEOUT * 3 + 10)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load process did not finish\n{self.procs.log_tail('load')}") from None
        self.procs.stop(load)
        if load.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"load process failed ({load.returncode})\n{self.procs.log_tail('load')}")
        raw = json.loads(out_path.read_text())
        gw_alive = self.gateway_gone() is None
        self.stop_instances()
        self.procs.stop(self.gw, timeout=10)
        log_text = (self.workdir / "gateway.log").read_text(errors="replace")
        phases = {"baseline": (b0, b1, cpu_delta(cpu_b0, cpu_b1)), "reload": (r0, r1, cpu_delta(cpu_r0, cpu_r1))}
        return analyse(a, raw, phases, reloads, stats0, stats1, upstreams, log_text, ups, {
            "pinning": self.plan.note, "trigger": self.trigger, "notes": self.notes,
            "stopped_early": stopped_early, "gateway_alive_at_end": gw_alive,
            "instances": len(self.instances) or 1,
            "rss_mib": {"before": round(rss0 / MIB, 1), "after": round(rss1 / MIB, 1)},
        })


class TriggerUnavailable(Exception):
    pass


# =========================================================================== analysis


def cpu_delta(c0: dict[str, float], c1: dict[str, float]) -> dict[str, float]:
    return {k: c1[k] - c0[k] for k in c1}


def pct(sorted_vals: list[float], q: float) -> float | None:
    n = len(sorted_vals)
    return round(sorted_vals[max(0, math.ceil(n * q) - 1)] * 1e3, 3) if n else None


def lat_summary(vals: list[float]) -> dict:
    v = sorted(vals)
    return {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99), "p99.9": pct(v, 0.999),
            "max": round(v[-1] * 1e3, 3) if v else None}


def near_reload(t: float, reloads: list[dict]) -> dict | None:
    """Where `t` falls against the reloads: the last trigger at or before it (ms since
    its trigger and since its confirmation), and ms to the next trigger."""
    before = [r for r in reloads if r["t_trigger"] <= t]
    after = [r for r in reloads if r["t_trigger"] > t]
    out: dict = {}
    if before:
        r = before[-1]
        out["reload"] = reloads.index(r) + 1
        out["ms_after_trigger"] = round((t - r["t_trigger"]) * 1e3, 2)
        if r.get("t_done"):
            out["ms_after_done"] = round((t - r["t_done"]) * 1e3, 2)
    if after:
        out["ms_before_next_trigger"] = round((after[0]["t_trigger"] - t) * 1e3, 2)
    return out or None


def analyse(a, raw: dict, phases: dict, reloads: list[dict], stats0: dict, stats1: dict, upstreams,
            log_text: str, ups: list[int], meta: dict) -> dict:
    res: dict = {"meta": {**meta, "args": {k: v for k, v in vars(a).items()},
                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "upstream_ports": ups},
                 "phases": {}}
    # The configs a request may have been routed on: it was read by the gateway at some
    # moment between its send and its answer; a swap happened at some moment between a
    # reload's trigger and its confirmation. An answer from any other config is stale.
    ok_reloads = [r for r in reloads if r.get("ok")]

    def configs_during(t0: float, t1: float) -> set[str]:
        cfg, out = "A", set()
        for r in ok_reloads:
            if r["t_trigger"] > t1:
                break
            if r["t_done"] >= t0:
                out.add(cfg)  # in force at some moment of [t0, t1] (before the swap)
            cfg = r["to"]
        out.add(cfg)
        return out

    for name, (t0, t1, cpus) in phases.items():
        wall = t1 - t0
        cpu = cpus["gateway"]
        other = cpus["machine"] - sum(v for k, v in cpus.items() if k != "machine")
        rows = [r for r in raw["http"] if t0 <= r[0] < t1]
        by_kind = {k: [r for r in rows if r[3] == k] for k in ("keepalive", "fresh", "body")}
        fails = [f for f in raw["failures"] if t0 <= f["t"] < t1]
        non2xx: dict[str, int] = {}
        for r in rows:
            if not 200 <= r[2] < 300:
                non2xx[str(r[2])] = non2xx.get(str(r[2]), 0) + 1
        served = {"U1": sum(1 for r in rows if r[4] == 1), "U2": sum(1 for r in rows if r[4] == 2),
                  "unknown": sum(1 for r in rows if r[4] == 0)}
        stale_http = [r for r in rows if "targets" in a.vary and r[4]
                      and ("A" if r[4] == 1 else "B") not in configs_during(r[0], r[0] + r[1])]
        probe = [r for r in raw["probe"] if t0 <= r[0] < t1]
        probe_status: dict[str, int] = {}
        stale_probe = []
        for r in probe:
            key = f"{r[3]} {r[2]}"
            probe_status[key] = probe_status.get(key, 0) + 1
            if r[2] in (200, 404) and "routes" in a.vary:
                answered_by = r[3][-1].upper() if r[2] == 200 else ("B" if r[3] == "/only-a" else "A")
                if answered_by not in configs_during(r[0], r[0] + r[1]):
                    stale_probe.append(r)
        msgs = [m for m in raw["ws_msgs"] if t0 <= m[0] < t1]
        events = [e for e in raw["ws_events"] if t0 <= e["t"] < t1]
        res["phases"][name] = {
            "window_s": round(wall, 3),
            "http": {
                "answered": len(rows), "rps": round(len(rows) / wall, 1) if wall else None,
                "failed": len(fails), "non_2xx": non2xx, "served_by": served,
                "latency_ms": {k: lat_summary([r[1] for r in v]) for k, v in by_kind.items()},
                "stale": len(stale_http),
                "stale_examples": [{"t": r[0], "upstream": f"U{r[4]}", "kind": r[3],
                                    "where": near_reload(r[0], reloads)} for r in stale_http[:10]],
            },
            "probe": {"answers": probe_status, "stale": len(stale_probe),
                      "stale_examples": [{"t": r[0], "path": r[3], "status": r[2],
                                          "where": near_reload(r[0], reloads)} for r in stale_probe[:10]]},
            "ws": {"messages_sent": len(msgs) + sum(1 for t in raw["ws"]["unanswered_sent_at"] if t0 <= t < t1),
                   "echoed": len(msgs), "echo_ms": lat_summary([m[1] for m in msgs]),
                   "events": len(events)},
            "gateway_cpu_s": round(cpu, 2), "gateway_cpu_util": round(cpu / wall, 3) if wall else None,
            "cpu_s": {k: round(v, 2) for k, v in cpus.items()},
            # busy CPU of the machine not spent by this bench's processes (other users' load)
            "other_cpu_s": round(other, 2),  # /proc/stat ticks vs per-process times: +-0.5 s of noise
        }
    # failures, in detail, with where they fell against the reloads
    res["failures"] = [{**f, "where": near_reload(f["t"], reloads)} for f in raw["failures"]]
    res["ws_events"] = [{**e, "where": near_reload(e["t"], reloads)} for e in raw["ws_events"]]
    ws = raw["ws"]
    res["ws"] = {k: ws[k] for k in ("opened", "states", "close_timeouts", "clean_closes", "sent", "echoed",
                                    "unanswered", "churn")}
    res["ws"]["lost"] = ws["sent"] - ws["echoed"]
    res["ws"]["dropped_or_unclean"] = ws["opened"] - ws["clean_closes"]
    secs = sorted(r["seconds"] for r in reloads if r.get("ok") and r.get("seconds") is not None)
    calls = sorted(r["call_ms"] for r in reloads if r.get("call_ms") is not None)
    # The log line times the whole reload (read, parse, validate, build, swap); /stats
    # `reloads.last.seconds` only the build and swap (runtime.reload.apply).
    logged = sorted(float(m) for m in re.findall(r"reloaded config \S+ in ([\d.]+) ms", log_text))
    confirms = sorted(r["confirm_ms"] for r in reloads if r.get("confirm_ms") is not None)
    res["reloads"] = {
        "count": len(reloads), "ok": sum(1 for r in reloads if r.get("ok")),
        "seconds_gateway": {"median_ms": round(secs[len(secs) // 2] * 1e3, 2) if secs else None,
                            "max_ms": round(secs[-1] * 1e3, 2) if secs else None},
        "logged_ms": {"n": len(logged), "median": logged[len(logged) // 2], "max": logged[-1]} if logged else None,
        "admin_call_ms": {"median": calls[len(calls) // 2], "max": calls[-1]} if calls else None,
        "confirm_ms": {"median": confirms[len(confirms) // 2], "max": confirms[-1]} if confirms else None,
        "records": reloads,
    }
    res["gateway"] = {
        "stats_reloads": {str(pid): s.get("reloads") for pid, s in stats1.items()},
        "stats_errors_delta": _errors_delta(stats0, stats1),
        "upstreams_end": upstreams,
        "log_errors": [ln for ln in log_text.splitlines() if " ERROR " in ln or "Traceback" in ln][:40],
        "log_warnings": _count_warnings(log_text),
    }
    return res


def _errors_delta(s0: dict, s1: dict) -> dict:
    out: dict[str, int] = {}
    for pid, s in s1.items():
        e0 = (s0.get(pid) or {}).get("errors") or {}
        for k, v in (s.get("errors") or {}).items():
            if isinstance(v, int) and v - e0.get(k, 0):
                out[k] = out.get(k, 0) + v - e0.get(k, 0)
    return out


def _count_warnings(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for ln in text.splitlines():
        if " WARNING " in ln:
            msg = ln.split(" WARNING ", 1)[1][:120]
            out[msg] = out.get(msg, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:10])


# =========================================================================== report


def _f(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)




def must_be_zero(res: dict) -> list[str]:
    bad = []
    for name, ph in res["phases"].items():
        if ph["http"]["failed"]:
            bad.append(f"{name}: {ph['http']['failed']} failed HTTP requests")
        # After a takeover the old instance answers on its own kept-alive connections
        # (with the config it had) until they close: expected, counted, not a failure.
        if (ph["http"]["stale"] or ph["probe"]["stale"]) and res["meta"]["trigger"] != "takeover":
            bad.append(f"{name}: {ph['http']['stale']} stale proxy answers, {ph['probe']['stale']} stale route probes")
    ws = res["ws"]
    if ws["dropped_or_unclean"]:
        bad.append(f"{ws['dropped_or_unclean']} of {ws['opened']} WebSockets dropped or closed uncleanly "
                   f"({ws['states']})")
    if ws["lost"]:
        bad.append(f"{ws['lost']} WebSocket messages lost")
    if ws["churn"]["failed"]:
        bad.append(f"{ws['churn']['failed']} churn WebSockets failed")
    if res["meta"]["stopped_early"]:
        bad.append(f"reload phase stopped early: {res['meta']['stopped_early']}")
    return bad


def table(rows: list[list[str]], head: list[str]) -> str:
    return _table(head, rows, align_left=1)  # report.table: first column left, the rest right


def print_report(res: dict) -> None:
    a = res["meta"]["args"]
    ph = res["phases"]
    base = ph["baseline"]
    print(f"\nReload under load: workers {a['workers']}, trigger {res['meta']['trigger']}, "
          f"a reload every {a['interval']:g} s for {a['duration']:g} s; HTTP: {a['keepalive']} keep-alive + "
          f"{a['fresh']} fresh-connection clients (think {a['think']:g} ms) + {a['body_clients']} POST client(s) "
          f"(body halves {a['body_gap']:g} ms apart); {a['websockets']} WebSockets, "
          f"a message every {a['ws_every']:g} ms each")
    rows = []
    for name, p in ph.items():
        h = p["http"]
        for kind in ("keepalive", "fresh", "body"):
            lat = h["latency_ms"][kind]
            if not lat["n"] and kind == "body":
                continue
            b = base["http"]["latency_ms"][kind]
            rows.append([name, kind, str(lat["n"]), _f(lat["p50"], 3), _f(lat["p99"], 3), _f(lat["max"], 1),
                         f"{lat['p50'] / b['p50']:.2f}x" if lat["p50"] and b["p50"] else "-",
                         f"{lat['p99'] / b['p99']:.2f}x" if lat["p99"] and b["p99"] else "-"])
    print("\nHTTP latency (GET /api/hello through the shared proxy route):")
    print(table(rows, ["phase", "client", "answered", "p50 ms", "p99 ms", "max ms", "p50/base", "p99/base"]))
    rows = []
    for name, p in ph.items():
        h = p["http"]
        rows.append([name, _f(p["window_s"], 1), str(h["answered"]), _f(h["rps"], 0), str(h["failed"]),
                     ", ".join(f"{k}: {v}" for k, v in sorted(h["non_2xx"].items())) or "0",
                     f"{h['served_by']['U1']}/{h['served_by']['U2']}", str(h["stale"]),
                     ", ".join(f"{k}: {v}" for k, v in sorted(p["probe"]["answers"].items())),
                     str(p["probe"]["stale"]), _f(p["gateway_cpu_s"]), _f(p["gateway_cpu_util"]),
                     _f(p["other_cpu_s"])])
    print("\nPer phase:")
    print(table(rows, ["phase", "s", "answered", "req/s", "FAILED", "non-2xx", "U1/U2", "stale",
                       "route probes", "stale probes", "gw CPU s", "util", "other CPU s"]))
    rows = []
    for name, p in ph.items():
        w = p["ws"]
        rows.append([name, str(w["messages_sent"]), str(w["echoed"]), _f(w["echo_ms"]["p50"], 3),
                     _f(w["echo_ms"]["p99"], 3), _f(w["echo_ms"]["max"], 1), str(w["events"])])
    print("\nWebSocket messages (by send time):")
    print(table(rows, ["phase", "sent", "echoed", "echo p50 ms", "p99 ms", "max ms", "events"]))
    ws = res["ws"]
    print(f"WebSockets: {ws['opened']} opened, {ws['clean_closes']} closed cleanly at the end (1000 both ways), "
          f"dropped or unclean: {ws['dropped_or_unclean']} {ws['states']}; messages sent {ws['sent']}, "
          f"echoed {ws['echoed']}, lost {ws['lost']}; churn handshakes ok {ws['churn']['ok']}, "
          f"failed {ws['churn']['failed']}")
    r = res["reloads"]
    sg = r["seconds_gateway"]
    lg = r["logged_ms"] or {}
    if res["meta"]["trigger"] == "takeover":
        print(f"\nTakeovers: {r['ok']} ok of {r['count']} triggered ({res['meta']['instances']} gateway instances); "
              f"SIGUSR2 to the successor serving (named in the pidfile) median {_f(r['confirm_ms']['median'])} ms, "
              f"max {_f(r['confirm_ms']['max'])} ms; answers after a hand-over from the old instance's "
              f"kept-alive connections are in 'stale' (expected)" if r["confirm_ms"] else "")
    else:
        print(f"\nReloads: {r['ok']} ok of {r['count']} triggered; one reload: /stats reloads.last.seconds "
              f"(build + swap) median {_f(sg['median_ms'])} ms, max {_f(sg['max_ms'])} ms; gateway log "
              f"(read + validate + build + swap, {lg.get('n', 0)} lines) median {_f(lg.get('median'))} ms, "
              f"max {_f(lg.get('max'))} ms"
              + (f"; admin call median {_f(r['admin_call_ms']['median'])} ms, max {_f(r['admin_call_ms']['max'])} ms"
                 if r["admin_call_ms"] else "")
              + (f"; trigger to counted in every worker's /stats median {_f(r['confirm_ms']['median'])} ms, "
                 f"max {_f(r['confirm_ms']['max'])} ms" if r["confirm_ms"] else ""))
    print(f"gateway RSS: {res['meta']['rss_mib']['before']} MiB before the baseline, "
          f"{res['meta']['rss_mib']['after']} MiB after the reloads; /stats reloads at the end: "
          f"{res['gateway']['stats_reloads']}")
    if res["gateway"]["stats_errors_delta"]:
        print(f"gateway /stats errors over the run: {res['gateway']['stats_errors_delta']}")
    for note in res["meta"]["notes"]:
        print(f"note: {note}")
    if res["meta"]["stopped_early"]:
        print(f"STOPPED EARLY: {res['meta']['stopped_early']}")
    if res["failures"]:
        print(f"\nHTTP failures ({len(res['failures'])}; first 15; 'where' = against the last reload before it):")
        for f in res["failures"][:15]:
            print(f"  {f['client']} {f.get('path', '')} {f['kind']}: {f['error'][:160]!r} "
                  f"(request {f['request_on_connection']} on its connection; {f['where']})")
    if res["ws_events"]:
        print(f"\nWebSocket events ({len(res['ws_events'])}; first 15):")
        for e in res["ws_events"][:15]:
            detail = {k: v for k, v in e.items() if k not in ("t", "ws", "event", "where")}
            print(f"  ws {e['ws']} {e['event']}: {detail} ({e['where']})")
    if res["gateway"]["log_errors"]:
        print("\ngateway log, ERROR lines (first 10):")
        for ln in res["gateway"]["log_errors"][:10]:
            print(f"  {ln[:220]}")
    if res["gateway"]["log_warnings"]:
        print(f"gateway log, WARNING lines by message: {res['gateway']['log_warnings']}")
    bad = must_be_zero(res)
    print("\n" + ("must-be-zero: all zero" if not bad else "must-be-zero NOT met:\n  " + "\n  ".join(bad)))




# =========================================================================== CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/reload_under_load.py",
        description="Hot reload under load: HTTP and WebSocket load through the gateway while its "
                    "config is swapped every --interval seconds.",
        epilog="See benches/README.md (Reload under load) for what each figure means.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--duration", type=float, default=30.0, help="seconds of each phase (baseline, reload)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between reloads")
    p.add_argument("--workers", type=int, default=1, help="gateway workers")
    p.add_argument("--trigger", choices=("auto", "sighup", "admin", "takeover"), default="auto",
                   help="how to reload: SIGHUP to the gateway pid, POST /config/reload on the admin "
                        "listener, auto (SIGHUP if the pid catches it, else admin), or takeover "
                        "(SIGUSR2: a successor process takes the listeners; use --interval 3)")
    p.add_argument("--websockets", type=int, default=200, help="open WebSockets")
    p.add_argument("--ws-every", type=float, default=100.0, help="ms between two messages of one WebSocket")
    p.add_argument("--keepalive", type=int, default=4, help="HTTP clients on a kept-alive connection each")
    p.add_argument("--fresh", type=int, default=2, help="HTTP clients opening a connection per request")
    p.add_argument("--think", type=float, default=1.0, help="ms between an HTTP answer and the next request")
    p.add_argument("--body-clients", type=int, default=1,
                   help="HTTP clients sending POSTs whose body arrives in two halves --body-gap ms apart "
                        "(requests in flight, body still arriving, when a reload swaps)")
    p.add_argument("--body-gap", type=float, default=20.0, help="ms between the two halves of a POST body")
    p.add_argument("--route-timeout", default="3s",
                   help="integration timeout of the shared route (a stuck request is answered 504 then)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the baseline")
    p.add_argument("--vary", default="routes,targets,throttle",
                   help="what differs between A and B: routes (/only-a vs /only-b), targets (the shared "
                        "route's upstream on U1 vs U2), throttle (its rate); a comma-separated subset")
    p.add_argument("--no-throttle", action="store_true",
                   help="no throttle in A or B (with workers > 1: no shared-memory limit tables)")
    p.add_argument("--ws-upstream-change", action="store_true",
                   help="B changes the WebSocket upstream's pool too: its pool is retired at every reload")
    p.add_argument("--no-churn", action="store_true", help="no WebSocket open/echo/close churn client")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", help="results (default benches/out/reload-under-load-<ts>.json)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the configs and every process's log")
    a = p.parse_args(argv)
    a.vary = sorted({x.strip() for x in a.vary.split(",") if x.strip()})
    if set(a.vary) - {"routes", "targets", "throttle"}:
        p.error("--vary takes a subset of routes,targets,throttle")
    if a.no_throttle and "throttle" in a.vary:
        a.vary.remove("throttle")
    if a.duration <= 0 or a.interval <= 0 or a.workers < 1 or a.websockets < 0:
        p.error("need --duration > 0, --interval > 0, --workers >= 1, --websockets >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return load_main(argv[1:])
    a = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # every child inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-reload-"))
    bench = Bench(a, workdir)

    def stop() -> None:
        bench.stop_instances()
        bench.procs.close()

    # this controller shares the load core(s)
    res, code = guarded("benches/reload_under_load.py", bench.run, stop, workdir, keep_workdir=a.keep_workdir,
                        cores=bench.plan.load, errors={TriggerUnavailable: (2, "--trigger sighup: ")})
    if code is not None:
        return code
    print_report(res)
    print(f"\nJSON: {write_json(res, a.json, 'reload-under-load')}")
    return 1 if must_be_zero(res) else 0


if __name__ == "__main__":
    sys.exit(main())
