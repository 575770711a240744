#!/usr/bin/env python3
"""Long transfers through a real gateway, full size: a 200 MiB upload to an upstream that
reads slowly and a 200 MiB download to a client that reads slowly, each taking longer than
the integration's 29 s `timeout`. Both must succeed, and the gateway's memory must stay
flat: it streams the bodies, it does not hold them. (tests/upstream/test_long_transfers.py
checks the same behaviour scaled down: 16 MiB under 1 s timeouts.)

Each direction gets a fresh gateway, `edgeplane serve -c CONFIG` as a separate process
(`workers: 1`, `access_log: off`, an insecure admin listener on loopback for readiness,
`limits: {max_body_bytes: 1GiB}` or `--size` if larger) with one route:

    - route: "ANY /up/{proxy+}"
      integration: {type: http, upstream: app, path: "/{proxy}", timeout: 29s, idle_timeout: 10s}

- `upload`: `app` is `_slow-reader` (this file, run as a child process), an asyncio
  server that reads a request body at `--rate` bytes/s (64 KiB reads, paced against the
  clock) and answers 200 `{"received": N, "seconds": S}`. This process sends
  `POST /up/load` with a `--size` Content-Length body, 256 KiB writes, as fast as the
  gateway takes them (the gateway's backpressure sets the pace).
- `download`: `app` is `_fast-sender` (this file, a child process): `GET /bytes/{n}`
  answers n bytes with a Content-Length, written as fast as the gateway reads them.
  (`edgeplane demo-upstream` caps `/bytes/{n}` at 64 MiB, hence this sender.) This
  process sends `GET /up/bytes/{size}` and reads the body at `--rate` bytes/s.

The defaults (200 MiB at 6 MiB/s) make each transfer last about 33 s: past the 29 s
`timeout` and far past the 10 s `idle_timeout`, which only a body that stops moving trips.

Before each transfer one small warm-up request goes the same way (1 KiB), so one-time
costs (the upstream connection, lazily built state) are not counted as growth. Then the
gateway's RSS (`procs.rss_bytes`: VmRSS of the gateway process and all its descendants,
summed) is sampled every 0.5 s from just before the first byte to just after the last.

**Memory flat** means: max RSS during the transfer minus RSS at its start is below
`--max-growth` (default 32 MiB). Why 32 MiB: a gateway that buffered the body, or leaked
per chunk, would grow by a large share of the 200 MiB (hundreds of MiB); a streaming one
holds a few socket-buffer-sized chunks (request_buffering is 64 KiB, reads and writes are
bounded by the transports' high-water marks) plus allocator noise, a few MiB. 32 MiB is
1/6 of the transfer and several times the noise, so it separates the two cleanly.

Pinning as benches/run.py (`procs.cpu_plan(1)`): the gateway on the first core; this
controller and the upstream on the other(s). Every child runs in its own process group
and is stopped at the end, on errors and Ctrl-C alike (`procs.guarded`).

Output: a JSON summary and a markdown table on stdout; `--json FILE` also writes the JSON
with every RSS sample. Exit status 1 if a transfer fails (status, byte count, a stall) or
the gateway's memory grows past `--max-growth`; 130 on Ctrl-C.

    .venv/bin/python benches/long_transfer.py                       # both ways, ~75 s
    .venv/bin/python benches/long_transfer.py --size 32MiB --rate 16MiB --only upload
    .venv/bin/python benches/long_transfer.py --ports 27000-27999 --scratch /tmp/longxfer --json /tmp/longxfer/out.json
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from procs import (  # noqa: E402
    Ports,
    Procs,
    cpu_plan,
    cpu_seconds,
    edgeplane_argv,
    guarded,
    rss_bytes,
)

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
DEFAULT_SIZE = "200MiB"
DEFAULT_RATE = "6MiB"
DEFAULT_MAX_GROWTH = "32MiB"
TIMEOUT_S = 29.0  # the route's integration timeout
IDLE_TIMEOUT_S = 10.0  # the route's integration idle_timeout
SAMPLE_EVERY = 0.5  # s between RSS samples
READ_PIECE = 64 * KIB  # slow sides read this much at a time
WRITE_PIECE = 256 * KIB  # fast sides write this much at a time
STALL_S = 30.0  # client side: no progress for this long ends a transfer (the gateway's own idle_timeout is 10 s)
WARMUP_BYTES = 1024
DIRECTIONS = ("upload", "download")


def parse_size(text: str) -> int:
    """'200MiB', '6MiB', '1GiB', '64KiB', '1000000', '1.5MiB', '10MB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200MiB, 6MiB, 1048576)")
    unit = (m.group(2) or "B").lower()
    mult = {"b": 1, "kib": KIB, "mib": MIB, "gib": GIB, "kb": 10**3, "mb": 10**6, "gb": 10**9}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


# =========================================================================== HTTP bits


def parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """(first line, lower-cased header names -> values) of a request or response head."""
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers and (Content-Length) body of one response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    first, headers = parse_head(head)
    status = int(first.split(b" ")[1])
    length = int(headers.get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return status, headers, body


# =========================================================================== child: _slow-reader


async def slow_reader(port: int, rate: int) -> None:
    """Reads each request body at `rate` bytes/s, answers 200 {"received", "seconds"}."""
    loop = asyncio.get_running_loop()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: the gateway pools its upstream connections
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                _, headers = parse_head(head)
                if b"content-length" not in headers and b"transfer-encoding" in headers:
                    body = b'{"message":"Content-Length required"}'
                    writer.write(b"HTTP/1.1 411 Length Required\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%b" % (len(body), body))
                    await writer.drain()
                    return
                length = int(headers.get(b"content-length", b"0"))
                t0 = loop.time()
                got = 0
                while got < length:
                    data = await reader.read(min(READ_PIECE, length - got))
                    if not data:
                        print(f"slow reader: peer closed after {got} of {length} bytes", file=sys.stderr, flush=True)
                        return
                    got += len(data)
                    delay = t0 + got / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                seconds = loop.time() - t0
                if length > WARMUP_BYTES:
                    print(f"slow reader: {got} bytes in {seconds:.2f} s", file=sys.stderr, flush=True)
                body = json.dumps({"received": got, "seconds": round(seconds, 3)}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"slow reader: listening on 127.0.0.1:{port}, {rate} bytes/s", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


# =========================================================================== child: _fast-sender


async def fast_sender(port: int) -> None:
    """GET /bytes/{n}: n bytes of `x` (Content-Length), as fast as the reader takes them;
    anything else: 200 `ok`."""
    piece = memoryview(b"x" * WRITE_PIECE)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                first, headers = parse_head(head)
                length = int(headers.get(b"content-length", b"0"))
                if length:
                    await reader.readexactly(length)  # a request body is read and dropped
                parts = first.split(b" ")
                m = re.fullmatch(rb"/bytes/(\d{1,13})", parts[1] if len(parts) > 1 else b"")
                n = int(m.group(1)) if m else 2
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\n\r\n" % n)
                if not m:
                    writer.write(b"ok")
                sent = 0
                while sent < n:
                    k = min(WRITE_PIECE, n - sent)
                    writer.write(piece[:k])
                    await writer.drain()
                    sent += k
                await writer.drain()
                if n > WARMUP_BYTES:
                    print(f"fast sender: {sent} bytes sent", file=sys.stderr, flush=True)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"fast sender: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def child_main(argv: list[str]) -> int:
    name = argv[0]
    p = argparse.ArgumentParser(prog=f"long_transfer.py {name}",
                                description="a child of benches/long_transfer.py (an upstream)")
    p.add_argument("--port", type=int, required=True)
    if name == "_slow-reader":
        p.add_argument("--rate", type=parse_size, default=parse_size(DEFAULT_RATE),
                       help="bytes per second the body is read at (default 6MiB)")
    a = p.parse_args(argv[1:])
    try:
        asyncio.run(slow_reader(a.port, a.rate) if name == "_slow-reader" else fast_sender(a.port))
    except KeyboardInterrupt:
        pass
    return 0


# =========================================================================== clients


async def upload(port: int, size: int, overall: float) -> dict:
    """POST /up/load with a `size` Content-Length body, as fast as the gateway takes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    out: dict = {"status": None, "bytes": 0, "error": None}
    try:
        writer.write(b"POST /up/load HTTP/1.1\r\nhost: bench\r\ncontent-type: application/octet-stream\r\n"
                     b"content-length: %d\r\n\r\n" % size)
        chunk = memoryview(b"x" * WRITE_PIECE)

        async def send() -> None:
            nonlocal sent
            while sent < size:
                k = min(WRITE_PIECE, size - sent)
                writer.write(chunk[:k])
                try:
                    await asyncio.wait_for(writer.drain(), STALL_S)
                except TimeoutError:
                    raise RuntimeError(f"the gateway took no byte for {STALL_S:.0f} s "
                                       f"after {sent} of {size}") from None
                sent += k

        sender = asyncio.ensure_future(send())
        answer = asyncio.ensure_future(read_response(reader, overall))
        done, _ = await asyncio.wait({sender, answer}, timeout=overall, return_when=asyncio.FIRST_COMPLETED)
        if sender in done and sender.exception() is None:
            await asyncio.wait({answer}, timeout=overall)
        elif sender in done:  # the send failed: the gateway may still have answered (504, 413, ...)
            out["error"] = f"send: {type(sender.exception()).__name__}: {sender.exception()}"
            await asyncio.wait({answer}, timeout=5)
        if answer.done() and answer.exception() is None:
            status, _, body = answer.result()
            out["status"] = status
            try:
                out["upstream"] = json.loads(body)
                out["bytes"] = int(out["upstream"].get("received", 0))
            except (ValueError, AttributeError):
                out["upstream"] = body[:200].decode(errors="replace")
            if not sender.done():
                out["error"] = out["error"] or f"answered {status} after {sent} of {size} bytes sent"
        elif out["error"] is None:
            exc = answer.exception() if answer.done() else None
            out["error"] = (f"response: {type(exc).__name__}: {exc}" if exc
                            else f"no response within {overall:.0f} s")
        for task in (sender, answer):
            task.cancel()
        await asyncio.gather(sender, answer, return_exceptions=True)
    finally:
        out["sent"] = sent
        writer.close()
    return out


async def download(port: int, size: int, rate: int | None, overall: float) -> dict:
    """GET /up/bytes/{size}, the body read at `rate` bytes/s (None: as fast as it comes)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_PIECE)
    out: dict = {"status": None, "bytes": 0, "error": None}
    got = 0
    try:
        writer.write(b"GET /up/bytes/%d HTTP/1.1\r\nhost: bench\r\n\r\n" % size)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S + 10)
        first, headers = parse_head(head)
        out["status"] = status = int(first.split(b" ")[1])
        length = int(headers.get(b"content-length", b"-1"))
        if status != 200 or length != size:
            body = await asyncio.wait_for(reader.read(4096), 5)
            out["error"] = (f"answered {status}, content-length {length if length >= 0 else 'none'} "
                            f"({headers.get(b'transfer-encoding', b'').decode()}): {body[:200]!r}")
            return out
        t0 = loop.time()
        deadline = t0 + overall
        while got < size:
            try:
                data = await asyncio.wait_for(reader.read(READ_PIECE), STALL_S)
            except TimeoutError:
                out["error"] = f"no byte for {STALL_S:.0f} s after {got} of {size}"
                break
            if not data:
                out["error"] = f"connection closed after {got} of {size} bytes"
                break
            got += len(data)
            if loop.time() > deadline:
                out["error"] = f"not done within {overall:.0f} s ({got} of {size} bytes)"
                break
            if rate:
                delay = t0 + got / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["bytes"] = got
        writer.close()
    return out


# =========================================================================== the run




def gateway_config(port: int, admin: int, upstream: int, max_body: int) -> dict:
    return {
        "listen": [f"127.0.0.1:{port}"],
        "workers": 1,
        "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},  # loopback, for readiness
        "access_log": {"destination": "off"},
        "limits": {"max_body_bytes": max_body},
        "upstreams": {"app": {"targets": [f"http://127.0.0.1:{upstream}"]}},
        "routes": [{"route": "ANY /up/{proxy+}", "integration": {
            "type": "http", "upstream": "app", "path": "/{proxy}",
            "timeout": f"{TIMEOUT_S:g}s", "idle_timeout": f"{IDLE_TIMEOUT_S:g}s"}}],
    }


def rss_total(pid: int) -> int:
    return sum(rss_bytes(pid).values())


def admin_get(port: int, path: str) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data
    except (OSError, ValueError):
        return None


class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(1, pin=not a.no_pin)
        self.ports = Ports(a.ports)
        self.me = str(Path(__file__).resolve())

    def run(self) -> dict:
        a = self.a
        print(f"pinning: {self.plan.note}", file=sys.stderr, flush=True)
        results = [self.one(d) for d in a.directions]
        return {
            "meta": {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([Path(sys.executable).name, "benches/long_transfer.py", *sys.argv[1:]]),
                "size_bytes": a.size, "rate_bytes_per_s": a.rate,
                "max_growth_bytes": a.max_growth, "sample_every_s": SAMPLE_EVERY,
                "integration": {"timeout_s": TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S},
                "pinning": self.plan.note,
            },
            "results": results,
            "ok": all(r["ok"] for r in results),
        }

    def one(self, direction: str) -> dict:
        a = self.a
        up = self.ports.get()
        child = (["_slow-reader", "--port", str(up), "--rate", str(a.rate)] if direction == "upload"
                 else ["_fast-sender", "--port", str(up)])
        upstream = self.procs.start_ready(child[0][1:], [sys.executable, self.me, *child], self.plan.load, up, "/")
        port, admin = self.ports.get(), self.ports.get()
        cfg = self.workdir / f"gateway-{direction}.yaml"
        cfg.write_text(json.dumps(gateway_config(port, admin, up, max(GIB, a.size)), indent=2) + "\n")
        gw = self.procs.start_ready(f"gateway-{direction}", edgeplane_argv() + ["serve", "-c", str(cfg)],
                                    self.plan.server, admin, "/ready")
        print(f"{direction}: {mib(a.size)} MiB at {mib(a.rate)} MiB/s "
              f"(about {a.size / a.rate:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            r = asyncio.run(self.measure(direction, port, gw.pid))
            stats = admin_get(admin, "/stats")
            r["gateway_errors"] = stats.get("errors") if stats else None
            if gw.poll() is not None:
                r["ok"] = False
                r["error"] = (r["error"] or "") + f" (gateway exited with {gw.returncode})"
        finally:
            self.procs.stop(gw)
            self.procs.stop(upstream)
        if not r["ok"]:
            r["gateway_log_tail"] = self.procs.log_tail(f"gateway-{direction}", 20)
        line = (f"{direction}: status {r['status']}, {r['bytes']} bytes in {r['duration_s']} s, "
                f"RSS {r['rss_start_mib']} -> max {r['rss_max_mib']} -> end {r['rss_end_mib']} MiB"
                + ("" if r["ok"] else f"  FAILED: {r['error'] or 'memory grew'}"))
        print(line, file=sys.stderr, flush=True)
        return r

    async def measure(self, direction: str, port: int, gw_pid: int) -> dict:
        a = self.a
        overall = 2 * a.size / a.rate + 60
        warm = await (upload(port, WARMUP_BYTES, 30) if direction == "upload"
                      else download(port, WARMUP_BYTES, None, 30))
        if warm["error"] or warm["status"] != 200 or warm["bytes"] != WARMUP_BYTES:
            raise RuntimeError(f"{direction}: the warm-up request failed: {warm}")
        loop = asyncio.get_running_loop()
        samples: list[tuple[float, int]] = []
        t0 = loop.time()

        async def sample() -> None:
            while True:
                samples.append((round(loop.time() - t0, 2), rss_total(gw_pid)))
                await asyncio.sleep(SAMPLE_EVERY)

        cpu0 = cpu_seconds(gw_pid)
        rss_start = rss_total(gw_pid)
        sampler = asyncio.ensure_future(sample())
        try:
            if direction == "upload":
                r = await upload(port, a.size, overall)
            else:
                r = await download(port, a.size, a.rate, overall)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        duration = loop.time() - t0
        rss_end = rss_total(gw_pid)
        cpu_s = cpu_seconds(gw_pid) - cpu0
        samples.append((round(duration, 2), rss_end))
        rss_max = max([rss_start] + [s for _, s in samples])
        growth = rss_max - rss_start
        transfer_ok = r["error"] is None and r["status"] == 200 and r["bytes"] == a.size
        flat = growth < a.max_growth
        return {
            "direction": direction,
            "ok": transfer_ok and flat,
            "transfer_ok": transfer_ok,
            "status": r["status"],
            "bytes": r["bytes"],
            "size": a.size,
            "duration_s": round(duration, 2),
            "mib_per_s": round(r["bytes"] / MIB / duration, 2) if duration > 0 else None,
            "past_timeout": duration > TIMEOUT_S,
            "rss_start_mib": mib(rss_start),
            "rss_max_mib": mib(rss_max),
            "rss_end_mib": mib(rss_end),
            "rss_growth_mib": mib(growth),
            "memory_flat": flat,
            "gateway_cpu_s": round(cpu_s, 2),
            "error": r["error"],
            **({"upstream": r["upstream"]} if "upstream" in r else {}),
            "rss_samples": [{"t": t, "rss_mib": mib(s)} for t, s in samples],
        }


# =========================================================================== report


def markdown_table(data: dict) -> str:
    cols = ["direction", "status", "bytes", "duration s", "MiB/s", "> 29 s", "RSS start MiB",
            "RSS max MiB", "RSS end MiB", "growth MiB", "flat", "gateway CPU s", "ok"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in data["results"]:
        cells = [r["direction"], r["status"], f"{r['bytes']:,}", r["duration_s"], r["mib_per_s"],
                 "yes" if r["past_timeout"] else "no", r["rss_start_mib"], r["rss_max_mib"], r["rss_end_mib"],
                 r["rss_growth_mib"], "yes" if r["memory_flat"] else "NO", r["gateway_cpu_s"],
                 "yes" if r["ok"] else "NO"]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    m = data["meta"]
    lines.append("")
    lines.append(f"flat = max RSS - start RSS < {mib(m['max_growth_bytes'])} MiB (gateway process tree, "
                 f"sampled every {m['sample_every_s']} s); integration timeout {m['integration']['timeout_s']:g} s, "
                 f"idle_timeout {m['integration']['idle_timeout_s']:g} s; {m['pinning']}")
    for r in data["results"]:
        if r["error"]:
            lines.append(f"- {r['direction']}: {r['error']}")
    return "\n".join(lines)


def summary(data: dict) -> dict:
    return {**data, "results": [{k: v for k, v in r.items() if k != "rss_samples"} for r in data["results"]]}


# =========================================================================== main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="long_transfer.py",
        description="A long upload to a slow-reading upstream and a long download to a slow-reading "
                    "client through edgeplane (each past the 29 s integration timeout), with the "
                    "gateway's RSS sampled every 0.5 s: both must succeed with memory flat.",
        epilog="Exit status: 0 all good; 1 a transfer failed or memory grew past --max-growth; 130 interrupted.",
    )
    p.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                   help=f"bytes each way (default {DEFAULT_SIZE}; units B, KiB, MiB, GiB, KB, MB, GB)")
    p.add_argument("--rate", type=parse_size, default=parse_size(DEFAULT_RATE),
                   help=f"bytes per second the slow side reads (default {DEFAULT_RATE}: 200 MiB in ~33 s)")
    p.add_argument("--only", choices=DIRECTIONS, default=None, help="run one direction only (default both)")
    p.add_argument("--max-growth", type=parse_size, default=parse_size(DEFAULT_MAX_GROWTH),
                   help=f"max RSS growth still counted as flat (default {DEFAULT_MAX_GROWTH})")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the JSON, with every RSS sample, to FILE")
    p.add_argument("--ports", metavar="LO-HI", default=None,
                   help="take every port from this range (default: any free port)")
    p.add_argument("--scratch", metavar="DIR", default=None,
                   help="parent of the temp work dir (configs, logs; default: the system's temp dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the work dir with the configs and logs")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    a = p.parse_args(argv)
    a.directions = [a.only] if a.only else list(DIRECTIONS)
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_slow-reader"], ["_fast-sender"]):
        return child_main(argv)
    a = parse_args(argv)
    if a.scratch:
        Path(a.scratch).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-longxfer-", dir=a.scratch))
    bench = Bench(a, workdir)
    data, code = guarded("benches/long_transfer.py", bench.run, bench.procs.close, workdir,
                         keep_workdir=a.keep_workdir, cores=bench.plan.load)
    if code is not None:
        return code
    print(json.dumps(summary(data), indent=2))
    print()
    print(markdown_table(data))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nJSON: {a.json}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
