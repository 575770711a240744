"""Memory added by idle keep-alive client connections (a budget row).

Starts `edgeplane serve` (one worker, a mock route, access log off), reads its VmRSS,
opens N client connections that each complete one keep-alive request and then stay
idle, reads VmRSS again, and reports the difference and the cost per connection.

    .venv/bin/python benches/idle_conns.py [--connections 10000] [--json FILE]

Bounded: the connections are opened in batches, each with a timeout, and all are
closed (and the gateway stopped) before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import free_port, rss_bytes, wait_http  # noqa: E402

CONFIG = """\
listen: ["127.0.0.1:{port}"]
admin: {{listen: "127.0.0.1:{admin}", insecure: true}}
access_log: {{destination: "off"}}
limits: {{keepalive_timeout: 600s}}
routes:
  - route: "GET /ping"
    integration: {{type: mock, body: {{"ok": true}}}}
"""
REQUEST = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n"


async def open_idle(port: int, n: int, batch: int = 500) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        await asyncio.wait_for(reader.readexactly(11), 10)  # {"ok":true}
        writers.append(writer)

    for start in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
    return writers


def rss_mib(pid: int) -> float:
    return sum(rss_bytes(pid).values()) / 2**20


async def measure(n: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, n + 1000)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "idle.yaml"
        conf.write_text(CONFIG.format(port=port, admin=admin))
        # The gateway inherits our raised descriptor limit.
        proc = subprocess.Popen([sys.executable, "-m", "edgeplane", "serve", "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(admin, "/healthz", proc)
            writers = await open_idle(port, 50)  # warm: first-use allocations
            time.sleep(0.5)
            before = rss_mib(proc.pid)
            writers += await open_idle(port, n)
            time.sleep(1.0)
            after = rss_mib(proc.pid)
            for w in writers:
                w.close()
            return {
                "connections": n,
                "rss_before_mib": round(before, 1),
                "rss_after_mib": round(after, 1),
                "added_mib": round(after - before, 1),
                "per_connection_kib": round((after - before) * 1024 / n, 2),
                "budget_mib": 60,
                "met": after - before <= 60,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10_000, help="idle connections (default 10000)")
    ap.add_argument("--json", help="also write the result as JSON to this file")
    args = ap.parse_args(argv)
    result = asyncio.run(measure(args.connections))
    print(f"{result['connections']} idle keep-alive connections: gateway RSS "
          f"{result['rss_before_mib']} -> {result['rss_after_mib']} MiB "
          f"(+{result['added_mib']} MiB, {result['per_connection_kib']} KiB each); "
          f"budget <= 60 MiB: {'met' if result['met'] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
