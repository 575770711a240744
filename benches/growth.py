#!/usr/bin/env python3
"""How the gateway's cost per request grows: CPU per request as the route table, the
request's header count, the open connections and a per-client throttle's clients grow.

Usage: .venv/bin/python benches/growth.py [--duration 4] [--only routes,headers,connections,clients]

One curve per dimension, each point a fresh gateway (one worker, access log off) in
front of the demo upstream, wrk on the load core(s), `GET /target/7` proxied as in the
`plain` scenario; the figure is gateway CPU microseconds per request (CPU-seconds of
the gateway's processes over the measured window, from /proc):

- routes: 10, 1,000, 10,000 other routes (`GET /rN/items/{id}`, literal first segments)
  beside the measured one: the route trie's depth is what matching pays, not the count;
- headers: 5 and 50 request headers (`X-Bench-N: value`);
- connections: 64, 1,000, 10,000 wrk connections (closed loop, keep-alive);
- clients: a per-client throttle keyed by `X-Client` (limits too high to refuse), wrk
  sending 1,000 or 100,000 distinct client ids at random (a Lua script).

A flat curve is the goal; `--json FILE` keeps every point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402
import wrkrun  # noqa: E402

POINTS = {"routes": (10, 1000, 10000), "headers": (5, 50), "connections": (64, 1000, 10000),
          "clients": (1000, 100000)}


def config(port: int, admin: int, up: int, *, routes: int = 0, throttle: bool = False) -> dict:
    target: dict = {"route": "GET /target/{id}", "integration": {"type": "http", "upstream": "demo"}}
    if throttle:
        target["throttle"] = {"rate": 1e9, "burst": 1_000_000, "key": "$request.header.X-Client"}
    extra = [{"route": f"GET /r{i}/items/{{id}}", "integration": {"type": "http", "upstream": "demo"}}
             for i in range(routes)]
    return {"listen": [f"127.0.0.1:{port}"], "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},
            "access_log": {"destination": "off"}, "log_level": "warning",
            "limits": {"max_connections": 20000},
            "upstreams": {"demo": {"targets": [f"http://127.0.0.1:{up}"], "pool": {"max_connections": 256}}},
            "routes": [target, *extra]}


def lua(headers: int, clients: int) -> str:
    lines = ["-- written by benches/growth.py"]
    for i in range(headers - 3):  # wrk sends Host and the connection headers itself
        lines.append(f'wrk.headers["X-Bench-{i}"] = "value-{i}"')
    if clients:
        lines.append(f"request = function() wrk.headers['X-Client'] = 'c' .. math.random({clients}) "
                     "return wrk.format() end")
    return "\n".join(lines) + "\n" + wrkrun._DONE


def point(runner: procs.Procs, plan: procs.CpuPlan, workdir: Path, up: int, args: argparse.Namespace, *,
          routes: int = 10, headers: int = 5, connections: int = 64, clients: int = 0) -> dict:
    port, admin = procs.free_port(), procs.free_port()
    cfg = workdir / "gw.yaml"
    cfg.write_text(json.dumps(config(port, admin, up, routes=routes, throttle=bool(clients))))
    gw = runner.start("gateway", [*procs.edgeplane_argv(), "serve", "-c", str(cfg)], plan.server)
    try:
        procs.wait_http(port, "/target/7", gw, timeout=60)
        script = workdir / "growth.lua"
        script.write_text(lua(headers, clients))
        threads = max(1, len(plan.load or {0}))
        base = [wrkrun.find() or "wrk", "-t", str(threads), "-c", str(connections), "--timeout", "5s", "-s",
                str(script)]
        pin = (lambda: os.sched_setaffinity(0, plan.load)) if plan.load else None
        subprocess.run([*base, "-d", "1s", f"http://127.0.0.1:{port}/target/7"], capture_output=True,
                       preexec_fn=pin)
        before = procs.cpu_seconds(gw.pid)
        out = subprocess.run([*base, "-d", f"{args.duration:g}s", f"http://127.0.0.1:{port}/target/7"],
                             capture_output=True, text=True, preexec_fn=pin)
        cpu = procs.cpu_seconds(gw.pid) - before
    finally:
        runner.stop(gw)
    r = wrkrun.parse(out.stdout, connections, True)
    n = r["requests"]
    return {"routes": routes, "headers": headers, "connections": connections, "clients": clients,
            "requests": n, "errors": r["errors_total"], "cpu_s": round(cpu, 3),
            "us_cpu_per_req": round(cpu / n * 1e6, 2) if n else None, "p99_ms": r["latency_ms"]["p99"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--only", default=",".join(POINTS), help="dimensions (default: all)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if wrkrun.find() is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    plan = procs.cpu_plan(1)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-growth-"))
    runner = procs.Procs(workdir)
    results: dict[str, list[dict]] = {}
    try:
        up = procs.free_port()
        upstream = runner.start("upstream", [*procs.edgeplane_argv(), "demo-upstream", "--port", str(up)],
                                plan.load)
        procs.wait_http(up, "/2b", upstream)
        for dim in [d.strip() for d in args.only.split(",") if d.strip()]:
            results[dim] = []
            for value in POINTS[dim]:
                r = point(runner, plan, workdir, up, args, **{dim: value})
                results[dim].append(r)
                print(f"{dim:<12} {value:>7,}  {r['us_cpu_per_req']:>7} us CPU/req  p99 {r['p99_ms']} ms  "
                      f"errors {r['errors']}", flush=True)
    finally:
        runner.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
