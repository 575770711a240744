#!/usr/bin/env python3
"""In-process integrations: what a route answered by a Python function or an
ASGI app costs, against the same answer from a mock route, and against the usual way of
serving the same Starlette app: uvicorn behind nginx.

Usage: PATH=...:$PATH .venv/bin/python benches/inprocess.py [--duration 6] [--connections 64]

Targets, each measured the same way (wrk on the load core for --duration seconds after a
1 s warm-up, `GET /x`, keep-alive; CPU-seconds of every process of the target, read
from /proc before and after):

- `mock`: an edgeplane route with a mock integration answering `{"ok":true}`;
- `function`: an edgeplane route with `type: function`, the async handler
  `bench_apps:hello` returning the same JSON (payload 2.0);
- `asgi`: an edgeplane route with `type: asgi`, the Starlette app `bench_apps:app`;
- `nginx+uvicorn`: nginx (one worker, upstream keep-alive) in front of uvicorn (one
  worker, httptools, uvloop, no access log) serving the same Starlette app; the CPU is
  nginx's plus uvicorn's.

Every server gets the server core(s), wrk the other (`procs.cpu_plan`). Prints req/s,
CPU-seconds and requests per CPU-second per target, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs  # noqa: E402
import wrkrun  # noqa: E402


def gateway_config(port: int, admin: int, kind: str) -> dict:
    integration = {"mock": {"type": "mock", "body": {"ok": True}},
                   "function": {"type": "function", "handler": "bench_apps:hello"},
                   "asgi": {"type": "asgi", "app": "bench_apps:app"}}[kind]
    return {"listen": [f"127.0.0.1:{port}"], "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},
            "access_log": {"destination": "off"}, "log_level": "warning",
            "routes": [{"route": "$default" if kind != "asgi" else "ANY /{proxy+}", "integration": integration}]}


def nginx_conf(d: Path, port: int, up: int) -> Path:
    temp = "\n".join(f"    {k}_temp_path {d}/{k}_temp;" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = d / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
""")
    return conf


def measure(name: str, port: int, roots: list[int], args: argparse.Namespace, workdir: Path, plan) -> dict:
    wrk = wrkrun.find()
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    url = f"http://127.0.0.1:{port}/x"
    warm = wrkrun.argv(wrk, url, connections=args.connections, duration=1, threads=1, method="GET", body_size=0,
                       keepalive=True, timeout=5, script_dir=workdir)
    subprocess.run(warm, capture_output=True, preexec_fn=lambda: os.sched_setaffinity(0, plan.load)
                   if plan.load else None)
    before = sum(procs.cpu_seconds(r) for r in roots)
    cmd = wrkrun.argv(wrk, url, connections=args.connections, duration=args.duration, threads=1, method="GET",
                      body_size=0, keepalive=True, timeout=5, script_dir=workdir)
    out = subprocess.run(cmd, capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, plan.load) if plan.load else None)
    cpu = sum(procs.cpu_seconds(r) for r in roots) - before
    result = wrkrun.parse(out.stdout, args.connections, True)
    requests = result["requests"]
    return {"target": name, "requests": requests, "rps": requests / args.duration, "cpu_s": round(cpu, 3),
            "req_per_cpu_s": round(requests / cpu) if cpu else None, "errors": result.get("errors_total", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    plan = procs.cpu_plan(1)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-inprocess-"))
    workdir.chmod(0o755)
    runner = procs.Procs(workdir)
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    results = []
    try:
        for kind in ("mock", "function", "asgi"):
            port, admin = procs.free_port(), procs.free_port()
            cfg = workdir / f"{kind}.yaml"
            cfg.write_text(json.dumps(gateway_config(port, admin, kind)))
            proc = runner.start(kind, [*procs.edgeplane_argv(), "serve", "-c", str(cfg)], plan.server, env=env)
            procs.wait_http(port, "/x", proc)
            results.append(measure(f"edgeplane {kind}", port, [proc.pid], args, workdir, plan))
            runner.stop(proc)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        up, port = procs.free_port(), procs.free_port()
        uv = runner.start("uvicorn", [sys.executable, "-m", "uvicorn", "bench_apps:app", "--port", str(up),
                                      "--no-access-log", "--log-level", "warning", "--http", "httptools",
                                      "--loop", "uvloop"], plan.server, env=env)
        procs.wait_http(up, "/x", uv)
        ng = runner.start("nginx", [nginx, "-p", str(workdir), "-c", str(nginx_conf(workdir, port, up))], plan.server)
        procs.wait_http(port, "/x", ng)
        results.append(measure("nginx+uvicorn", port, [ng.pid, uv.pid], args, workdir, plan))
    finally:
        runner.close()
    base = {r["target"]: r["req_per_cpu_s"] for r in results}
    print(f"{'target':<20} {'req/s':>9} {'CPU s':>7} {'req/CPU-s':>10} {'/ mock':>7} {'/ nginx+uvicorn':>16} "
          f"{'errors':>6}")
    for r in results:
        rate = r["req_per_cpu_s"] or 0
        print(f"{r['target']:<20} {r['rps']:>9,.0f} {r['cpu_s']:>7.2f} {rate:>10,} "
              f"{rate / base['edgeplane mock']:>7.2f} {rate / base['nginx+uvicorn']:>16.2f} {r['errors']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
