#!/usr/bin/env python3
"""Releases under load: a deploy, a rollback, a canary, its promotion and a
second rollback on stage `prod` while closed-loop keep-alive load runs on it; every
request must be answered 2xx, and every answer says which deployment served it.

What it measures, per step: how long after the change (the store's pointer written)
the answers switch (the first answer from the new deployment, and the moment after
which none comes from the old one any more: the store poll of `deploy.watch`, 1 s,
plus the reload), the requests answered, failed (non-2xx, reset, connection error,
5 s timeout: must be 0), req/s, p99/max latency, and the canary side's share.

Config (written as JSON, which is YAML; `data_dir` in the bench's temp dir): stages
`prod` and `dev`; two upstreams, `v1` and `v2`, each a demo upstream
(`edgeplane demo-upstream --port N`, which echoes the request as JSON, so an answer
names the upstream it came from by its `host`); the API is `ANY /api/{proxy+}` (an http
integration) and `GET /deployment` (a mock answering the version). File version 1
(`host.yaml`: the file the gateway serves, deployed as A, read by the rollback, reload
and canary commands) routes to `v1`; version 2 (`v2.yaml`, the same host settings,
deployed as B and B') routes to `v2`. An answer from v1 was served by A, from v2 by B.
`admin: {listen: 127.0.0.1:PORT, insecure: true}`, `access_log: off`.

Before the gateway starts: `edgeplane deploy -c host.yaml --stage prod` records A on
prod, `edgeplane deploy -c v2.yaml --stage dev` records B on dev. Then
`edgeplane serve -c host.yaml --workers N` and the load (`--connections` kept-alive
connections on `GET /prod/api/hello`, each sending its next request as soon as the
answer is in). After `--warmup` s and a `baseline` of `--duration` s, the steps, each
followed by `--duration` s of load (counted from the command's return):

1. `deploy B`: `edgeplane deploy -c v2.yaml --stage prod` (records B again, as B')
2. `rollback`: `edgeplane rollback -c host.yaml --stage prod` (back to A)
3. `canary`: `stages.prod.canary: {deployment: B, percent: --canary-percent}` is written
   into host.yaml (temp + rename) and the gateway is reloaded (`POST /config/reload` on
   the admin listener, what `edgeplane reload --admin` sends; `--canary-trigger cli`
   runs that command, `sighup` signals the gateway); ~10 % of answers must come from B
   (within 3 points, or 5 standard deviations of the binomial share if more)
4. `promote`: `edgeplane canary promote -c host.yaml --stage prod` (B everywhere)
5. `rollback`: `edgeplane rollback -c host.yaml --stage prod` (back to A)

Figures, per step (a window runs from its command's start to the next one's), in ms
after the change: the moment the controller saw the store's version move while the
command ran (it reads `SqliteStore.version()`, what the gateway polls, every 2 ms; the
command itself exits later), or for the canary step, the reload call. `CLI ms` is the command's whole run
(a Python start-up included), `written ms` when in it the store changed. `store
noticed ms` is the gateway's "deployment store ... changed" log line (the 1 s poll);
the JSON also has its "reloaded config ... in N ms" lines (`reload_ms`, per process,
and `all_workers_reload_ms`, the supervisor's). `first new ms`: the first answer
from the new side (none for the promotion: the canary served B before it); `100 % ms`:
the last answer from the old side (after it every answer is the new side's; with
several workers each worker switches on its own), or for the canary, the end of the
last 100 ms of answers whose B share was out of range. The release commands run on the
load generator's core, so req/s and latency dip in their windows (the gateway's core
is left alone).

Processes (each in its own process group via `procs.Procs`, pinned by
`procs.cpu_plan(--workers)`: the gateway on the server core(s); the upstreams, the load
process, this controller and the release commands on the other core(s)): the two demo
upstreams, the gateway, and the load process (this file, `_load`: asyncio raw sockets
on uvloop, the request/response primitives of `reload_under_load.py`). Every port is
taken from `--ports` (default 27000-27999) on 127.0.0.1; every process started is
stopped at the end, on error or Ctrl-C too.

    .venv/bin/python benches/release_under_load.py
    .venv/bin/python benches/release_under_load.py --workers 2 --duration 3 --json /tmp/release.json

Prints a JSON summary and a markdown table; the full results (every failure, the
commands' output) go to `--json` (default benches/out/release-under-load-<ts>.json).
Exit status: 0 when no request failed, every step switched and the canary share was
in range; 1 otherwise (or when a command or the run failed); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from edgeplane.deploy.store import SqliteStore, StoreError  # noqa: E402
from procs import (  # noqa: E402
    Procs,
    cpu_plan,
    cpu_seconds,
    edgeplane_argv,
    guarded,
    wait_http,
    wait_line,
    write_json,
)
from reload_under_load import Cut, _connect, _exchange, _kind, catches, http_call, lat_summary  # noqa: E402

PATH = "/prod/api/hello"
TIMEOUT = 5.0  # one request
MIN_DURATION = 1.5  # s: the store poll (1 s), a reload, and SETTLE
CLI_TIMEOUT = 60.0
STORE_POLL = 0.002  # s: how often the controller reads the store's version while a command runs
SETTLE = 0.25  # s: a full switch must be over this long before the next step starts
CANARY_BUCKET = 0.1  # s: the canary share is checked per bucket of answers
SIDES = {1: "A", 2: "B", 0: "?"}
CANARY_TOLERANCE = 0.03  # share points, or 5 sigma of the binomial share if larger

# =========================================================================== load process


def load_main(argv: list[str]) -> int:
    """`_load`: closed-loop keep-alive clients on PATH until SIGUSR1, then the rows as JSON."""
    p = argparse.ArgumentParser(prog="release_under_load.py _load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default=PATH)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--upstream-ports", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tags = {f'"host":"127.0.0.1:{port}"'.encode(): i + 1 for i, port in enumerate(a.upstream_ports)}
    request = f"GET {a.path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    rows: list[tuple[float, float, int, int]] = []  # (t_send wall, latency s, status, side 1=A 2=B 0=?)
    failures: list[dict[str, Any]] = []
    stop = False

    async def client(index: int) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        on_conn = 0
        while not stop:
            t_wall, t0 = time.time(), time.perf_counter()
            try:
                async with asyncio.timeout(TIMEOUT):
                    if sock is None:
                        sock, on_conn = await _connect(loop, a.port), 0
                    on_conn += 1
                    status, body, keep = await _exchange(loop, sock, request)
                dt = time.perf_counter() - t0
            except (OSError, Cut, TimeoutError) as exc:
                failures.append({"t": t_wall, "connection": index, "kind": _kind(exc),
                                 "error": str(exc) or type(exc).__name__, "request_on_connection": on_conn,
                                 "after_ms": round((time.perf_counter() - t0) * 1e3, 2)})
                if sock is not None:
                    sock.close()
                    sock = None
                await asyncio.sleep(0.01)
                continue
            side = next((i for tag, i in tags.items() if tag in body), 0)
            rows.append((round(t_wall, 6), round(dt, 6), status, side))
            if not 200 <= status < 300:
                failures.append({"t": t_wall, "connection": index, "kind": f"status_{status}",
                                 "error": body[:300].decode("latin-1"), "request_on_connection": on_conn,
                                 "after_ms": round(dt * 1e3, 2)})
            if not keep:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    async def run() -> None:
        nonlocal stop
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        tasks = [asyncio.create_task(client(i)) for i in range(a.connections)]
        print("ready", flush=True)
        await done.wait()
        stop = True
        await asyncio.wait(tasks, timeout=TIMEOUT + 1)

    import uvloop

    uvloop.run(run())
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": rows, "failures": failures}, f)
    os.replace(tmp, a.out)
    print("done", flush=True)
    return 0


# =========================================================================== controller


def pick_ports(n: int, lo: int, hi: int) -> list[int]:
    """`n` distinct ports of [lo, hi] free on 127.0.0.1 now (random order)."""
    candidates = list(range(lo, hi + 1))
    random.shuffle(candidates)
    out: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise RuntimeError(f"fewer than {n} free ports in {lo}-{hi} on 127.0.0.1")


def gateway_config(version: int, port: int, admin: int, ups: list[int], data_dir: Path,
                   canary: dict[str, Any] | None = None) -> dict[str, Any]:
    """File version 1 (deployment A: routes to v1) or 2 (deployment B: routes to v2)."""
    prod: dict[str, Any] = {"description": "the stage under load", "variables": {}}
    if canary is not None:
        prod["canary"] = canary
    return {
        "listen": [f"127.0.0.1:{port}"],
        "log_level": "info",
        "data_dir": str(data_dir),
        "admin": {"listen": f"127.0.0.1:{admin}", "insecure": True},
        "access_log": {"destination": "off"},
        "upstreams": {"v1": {"targets": [f"http://127.0.0.1:{ups[0]}"]},
                      "v2": {"targets": [f"http://127.0.0.1:{ups[1]}"]}},
        "stages": {"prod": prod, "dev": {"description": "where B is tried first"}},
        "routes": [
            {"route": "ANY /api/{proxy+}", "integration": {"type": "http", "upstream": f"v{version}",
                                                         "timeout": "3s"}},
            {"route": "GET /deployment", "integration": {"type": "mock", "body": f"version {version}",
                                                         "content_type": "text/plain"}},
        ],
    }


class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(a.workers, pin=not a.no_pin)
        self.commands: list[dict[str, Any]] = []
        self.data_dir = workdir / "data"

    def store_version(self) -> int | None:
        """The store's version, as the gateway's poll reads it (`SqliteStore.version()` on
        DATA_DIR); None while it cannot be read."""
        try:
            return SqliteStore(str(self.data_dir)).version()
        except StoreError:
            return None

    def cli(self, *args: str) -> dict[str, Any]:
        """Runs `edgeplane ARGS`; its record: times, exit status, output, and `t_written`,
        when the store's version moved while it ran (polled every STORE_POLL s): the
        moment the pointer changed, which the command's own exit follows by a while."""
        n = len(self.commands)
        log = self.workdir / f"cli-{n}.log"
        v0 = self.store_version() if (self.data_dir / "deployments.db").exists() else 0
        t0 = time.time()
        t_written = None
        with open(log, "wb") as out:
            p = subprocess.Popen(edgeplane_argv() + list(args), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + CLI_TIMEOUT
            while p.poll() is None and time.monotonic() < deadline:
                if t_written is None and v0 is not None:
                    v = self.store_version()
                    if v is not None and v != v0:
                        t_written = time.time()
                time.sleep(STORE_POLL)
            if p.poll() is None:
                p.kill()
                p.wait(5)
                rc: int | None = None
            else:
                rc = p.returncode
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        t1 = time.time()
        if t_written is None and v0 is not None and self.store_version() not in (None, v0):
            t_written = t1  # changed during the last poll interval
        text = log.read_text(errors="replace").strip()
        rec = {"argv": "edgeplane " + " ".join(args), "rc": rc,
               "output": text if rc is not None else text + f"\n(killed after {CLI_TIMEOUT:.0f}s)",
               "t_start": t0, "t_end": t1, "t_written": t_written, "ms": round((t1 - t0) * 1e3, 1),
               "written_ms": round((t_written - t0) * 1e3, 1) if t_written else None}
        self.commands.append(rec)
        return rec

    def write(self, path: Path, cfg: dict[str, Any]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        os.replace(tmp, path)

    def deploy_id(self, rec: dict[str, Any]) -> str:
        m = re.search(r"deployed (d-[0-9a-f]+)", rec["output"])
        if rec["rc"] != 0 or m is None:
            raise RuntimeError(f"{rec['argv']} failed ({rec['rc']}):\n{rec['output']}")
        return m.group(1)

    def run(self) -> dict[str, Any]:
        a = self.a
        print(f"pinning: {self.plan.note}", file=sys.stderr, flush=True)
        port, admin, up1, up2 = pick_ports(4, a.ports[0], a.ports[1])
        ups = [up1, up2]
        for name, up in (("upstream-v1", up1), ("upstream-v2", up2)):
            self.procs.start_ready(name, edgeplane_argv() + ["demo-upstream", "--port", str(up)], self.plan.load, up)

        data_dir = self.data_dir
        host, v2 = self.workdir / "host.yaml", self.workdir / "v2.yaml"
        self.write(host, gateway_config(1, port, admin, ups, data_dir))
        self.write(v2, gateway_config(2, port, admin, ups, data_dir))
        ids = {"A": self.deploy_id(self.cli("deploy", "-c", str(host), "--stage", "prod", "-m", "A (version 1)")),
               "B": self.deploy_id(self.cli("deploy", "-c", str(v2), "--stage", "dev", "-m", "B (version 2)"))}
        print(f"recorded A = {ids['A']} on prod, B = {ids['B']} on dev", file=sys.stderr, flush=True)

        self.gw = self.procs.start("gateway", edgeplane_argv() + ["serve", "-c", str(host), "--workers",
                                                                  str(a.workers)], self.plan.server)
        try:
            wait_http(admin, "/healthz", self.gw)
            wait_http(port, PATH, self.gw)
        except RuntimeError as exc:
            raise RuntimeError(f"gateway did not start: {exc}\n{self.procs.log_tail('gateway')}") from None

        out_path = self.workdir / "load.json"
        load = self.procs.start("load", [sys.executable, __file__, "_load", "--port", str(port), "--connections",
                                         str(a.connections), "--upstream-ports", f"{up1},{up2}",
                                         "--out", str(out_path)], self.plan.load)
        wait_line(self.workdir / "load.log", "ready", load, 30)
        gw_cpu0 = cpu_seconds(self.gw.pid)
        time.sleep(a.warmup)

        canary = {"deployment": ids["B"], "percent": a.canary_percent}
        steps: list[tuple[str, str, Any]] = [
            ("deploy B", "B", lambda: self.cli("deploy", "-c", str(v2), "--stage", "prod", "-m", "B' (version 2)")),
            ("rollback", "A", lambda: self.cli("rollback", "-c", str(host), "--stage", "prod")),
            (f"canary {a.canary_percent:g} %", "canary", lambda: self.add_canary(host, canary, port, admin, ups,
                                                                                 data_dir)),
            ("canary promote", "B", lambda: self.cli("canary", "promote", "-c", str(host), "--stage", "prod")),
            ("rollback", "A", lambda: self.cli("rollback", "-c", str(host), "--stage", "prod")),
        ]
        t = time.time()
        phases: list[dict[str, Any]] = [{"step": "baseline", "expect": "A", "t_start": t, "t_end": t, "ref": t}]
        print(f"baseline: {a.duration:g} s", file=sys.stderr, flush=True)
        time.sleep(a.duration)
        stopped = None
        for i, (name, expect, action) in enumerate(steps, 1):
            if self.gw.poll() is not None:
                stopped = f"the gateway exited with {self.gw.returncode}"
                break
            rec = action()
            phases.append({"step": f"{i}. {name}", "expect": expect, "t_start": rec["t_start"],
                           "t_end": rec["t_end"], "ref": rec["t_written"] or rec["t_end"], "command": rec})
            print(f"{i}. {rec['argv']} -> {rec['rc']} in {rec['ms']:.0f} ms: "
                  f"{rec['output'].splitlines()[0] if rec['output'] else ''}", file=sys.stderr, flush=True)
            if rec["rc"] != 0:
                stopped = f"step {i} ({rec['argv']}) failed with {rec['rc']}: {rec['output']}"
                break
            time.sleep(max(0.0, rec["t_end"] + a.duration - time.time()))
        t_stop = time.time()
        gw_cpu = cpu_seconds(self.gw.pid) - gw_cpu0
        history = self.cli("deployments", "-c", str(host), "--stage", "prod", "--format", "json")

        os.kill(load.pid, signal.SIGUSR1)
        try:
            load.wait(TIMEOUT * 2 + 10)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the load process did not finish\n{self.procs.log_tail('load')}") from None
        self.procs.stop(load)
        if load.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"the load process failed ({load.returncode})\n{self.procs.log_tail('load')}")
        raw = json.loads(out_path.read_text())
        gw_alive = self.gw.poll() is None
        self.procs.stop(self.gw, timeout=10)
        log_text = (self.workdir / "gateway.log").read_text(errors="replace")
        meta = {
            "args": vars(a), "pinning": self.plan.note, "ports": {"gateway": port, "admin": admin, "v1": up1,
                                                                  "v2": up2},
            "deployments": ids, "stopped_early": stopped, "gateway_alive_at_end": gw_alive,
            "gateway_cpu_s": round(gw_cpu, 2), "load_s": round(t_stop - phases[0]["t_start"], 2),
            "prod_history": _json_or_text(history["output"]),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return analyse(a, raw, phases, t_stop, log_text, meta, self.commands)

    def add_canary(self, host: Path, canary: dict[str, Any], port: int, admin: int, ups: list[int],
                   data_dir: Path) -> dict[str, Any]:
        """Step 3: the canary written into the served file, then a reload."""
        t0 = time.time()
        self.write(host, gateway_config(1, port, admin, ups, data_dir, canary))
        rec: dict[str, Any]
        trigger = self.a.canary_trigger
        if trigger == "cli":
            rec = self.cli("reload", "--admin", f"127.0.0.1:{admin}")
            rec["output"] = " ".join(rec["output"].split())  # its JSON answer, on one line
            rec["t_written"] = None  # somewhere inside the command: its start is used
        else:
            t1 = time.time()
            if trigger == "sighup":
                if not catches(self.gw.pid, signal.SIGHUP):  # it would kill the gateway
                    raise RuntimeError(f"the gateway (pid {self.gw.pid}) does not catch SIGHUP; not sent")
                os.kill(self.gw.pid, signal.SIGHUP)
                rec = {"argv": f"kill -HUP {self.gw.pid}", "rc": 0, "output": "SIGHUP sent"}
            else:  # what `edgeplane reload --admin` does, timed without its Python start-up
                status, data, _ = http_call(admin, "POST", "/config/reload")
                rec = {"argv": f"POST http://127.0.0.1:{admin}/config/reload", "rc": 0 if status == 200 else status,
                       "output": json.dumps(data)}
            rec["t_written"] = t1
            rec["t_end"] = time.time()
            self.commands.append(rec)
        rec["t_start"] = t0
        rec["t_written"] = rec["t_written"] or t0
        rec["ms"] = round((rec["t_end"] - t0) * 1e3, 1)
        rec["written_ms"] = round((rec["t_written"] - t0) * 1e3, 1)
        rec["argv"] = f"(write canary: {json.dumps(canary)}) && {rec['argv']}"
        return rec


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# =========================================================================== analysis

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_events(text: str) -> list[tuple[float, str, float | None]]:
    """(epoch time, "changed" | "reloaded" | "all_workers", ms) of the gateway's store and
    reload lines (one per process; with workers, the supervisor's for all of them)."""
    out: list[tuple[float, str, float | None]] = []
    for line in text.splitlines():
        m = _LOG_TIME.match(line)
        if m is None:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
        if "deployment store" in line and "changed" in line:
            out.append((t, "changed", None))
        elif (r := re.search(r"reloaded config \S+ in ([\d.]+) ms", line)) is not None:
            out.append((t, "reloaded", float(r.group(1))))
        elif (r := re.search(r"reloaded config \S+ in \d+ workers in ([\d.]+) ms", line)) is not None:
            out.append((t, "all_workers", float(r.group(1))))
    return out


def _ms(t: float | None, ref: float) -> float | None:
    return None if t is None else round((t - ref) * 1e3, 1)


def canary_bounds(percent: float, n: int) -> tuple[float, float]:
    p = percent / 100.0
    tol = max(CANARY_TOLERANCE, 5 * math.sqrt(p * (1 - p) / n)) if n else CANARY_TOLERANCE
    return max(0.0, p - tol), min(1.0, p + tol)


def canary_reached(in_w: list[list[Any]], first_new: float, w1: float, percent: float) -> float:
    """When the canary's share was reached: the end of the last CANARY_BUCKET of answers
    (by arrival, from the first canary answer on) whose B share was out of range, or the
    first canary answer if none was."""
    reached = first_new
    t = first_new
    while t < w1:
        bucket = [r for r in in_w if t <= r[0] + r[1] < t + CANARY_BUCKET and r[3]]
        if bucket:
            lo, hi = canary_bounds(percent, len(bucket))
            if not lo <= sum(1 for r in bucket if r[3] == 2) / len(bucket) <= hi:
                reached = min(t + CANARY_BUCKET, max(r[0] + r[1] for r in bucket))
        t += CANARY_BUCKET
    return reached


def analyse(a: argparse.Namespace, raw: dict[str, Any], phases: list[dict[str, Any]], t_stop: float,
            log_text: str, meta: dict[str, Any], commands: list[dict[str, Any]]) -> dict[str, Any]:
    rows = raw["rows"]
    failures = raw["failures"]
    events = log_events(log_text)
    problems: list[str] = []
    steps = []
    for i, ph in enumerate(phases):
        w0, w1 = ph["t_start"], phases[i + 1]["t_start"] if i + 1 < len(phases) else t_stop
        ref = ph["ref"]
        in_w = [r for r in rows if w0 <= r[0] < w1]
        fails = [f for f in failures if w0 <= f["t"] < w1]
        sides = {s: sum(1 for r in in_w if r[3] == k) for k, s in SIDES.items()}
        status: dict[str, int] = {}
        for r in in_w:
            status[str(r[2])] = status.get(str(r[2]), 0) + 1
        wall = w1 - w0
        cmd = ph.get("command") or {}
        step: dict[str, Any] = {
            "step": ph["step"], "expect": ph["expect"], "command": cmd.get("argv"), "window_s": round(wall, 3),
            "cli_ms": cmd.get("ms"), "written_ms": cmd.get("written_ms"),
            "requests": len(in_w), "failed": len(fails), "status": status, "served_by": sides,
            "rps": round(len(in_w) / wall, 1) if wall > 0 else None,
            "latency_ms": lat_summary([r[1] for r in in_w]),
            # the 3 slowest requests: latency, and when they were sent against the change
            "slowest": [{"ms": round(r[1] * 1e3, 1), "sent_ms_after_change": _ms(r[0], ref), "side": SIDES[r[3]]}
                        for r in sorted(in_w, key=lambda r: -r[1])[:3]],
        }
        if ph["step"] == "baseline":
            if sides["B"]:
                problems.append(f"baseline: {sides['B']} answers from B before any release")
            steps.append(step)
            continue
        new_k = 1 if ph["expect"] == "A" else 2  # the canary's new side is B too
        old_k = 3 - new_k
        done = [(r[0] + r[1], r[3]) for r in in_w]  # (answered at, side)
        # the first answer from the new side after the change; none when it served before
        # the change already (a promotion: the canary answered from B)
        served_before = any(s == new_k and t < ref for t, s in done)
        first_new = min((t for t, s in done if s == new_k and t >= ref), default=None)
        step["first_new_ms"] = None if served_before else _ms(first_new, ref)
        if ph["expect"] == "canary":
            after = [r for r in in_w if first_new is not None and r[0] + r[1] >= first_new and r[3]]
            n = len(after)
            share = sum(1 for r in after if r[3] == 2) / n if n else None
            lo, hi = canary_bounds(a.canary_percent, n)
            step["canary"] = {"percent": a.canary_percent, "answers": n,
                              "share_b": round(share, 4) if share is not None else None,
                              "expected_range": [round(lo, 4), round(hi, 4)],
                              "in_range": share is not None and lo <= share <= hi}
            step["all_new_ms"] = _ms(canary_reached(in_w, first_new, w1, a.canary_percent), ref) \
                if first_new is not None else None
            if first_new is None:
                problems.append(f"{ph['step']}: no answer from the canary (B) at all")
            elif not step["canary"]["in_range"]:
                problems.append(f"{ph['step']}: B took {share:.1%} of {n} answers, expected {lo:.1%}..{hi:.1%}")
        else:
            last_old = max((t for t, s in done if s == old_k), default=None)
            if first_new is None and not served_before:
                step["all_new_ms"] = None
                problems.append(f"{ph['step']}: no answer from {SIDES[new_k]} within {wall:.1f} s")
            else:
                step["all_new_ms"] = _ms(max(t for t in (first_new, last_old, ref) if t is not None), ref)
            # switched: nothing from the old side in the window's last SETTLE s
            step["old_answers_at_end"] = sum(1 for t, s in done if s == old_k and t >= w1 - SETTLE)
            if step["old_answers_at_end"]:
                problems.append(f"{ph['step']}: still {step['old_answers_at_end']} answers from {SIDES[old_k]} "
                                f"in the last {SETTLE * 1e3:.0f} ms of its window (not switched)")
        ev = [e for e in events if w0 <= e[0] < w1]
        changed = next((t for t, kind, _ in ev if kind == "changed"), None)
        step["store_noticed_ms"] = _ms(changed, ref)
        step["reload_ms"] = [ms for _, kind, ms in ev if kind == "reloaded"]  # per process
        step["all_workers_reload_ms"] = [ms for _, kind, ms in ev if kind == "all_workers"]  # the supervisor's
        if fails:
            problems.append(f"{ph['step']}: {len(fails)} failed requests")
        steps.append(step)
    if meta["stopped_early"]:
        problems.append(f"stopped early: {meta['stopped_early']}")
    if not meta["gateway_alive_at_end"]:
        problems.append("the gateway was not running at the end")
    refs = [(ph["step"], ph["ref"]) for ph in phases]

    def where(t: float) -> dict[str, Any]:
        name, ref = next(((n, r) for n, r in reversed(refs) if r <= t), refs[0])
        return {"step": name, "ms_after_change": round((t - ref) * 1e3, 1)}

    total = len(rows)
    return {
        "meta": meta,
        "totals": {"requests": total, "failed": len(failures),
                   "rps": round(total / (t_stop - phases[0]["t_start"]), 1) if total else None,
                   "served_by": {s: sum(1 for r in rows if r[3] == k) for k, s in SIDES.items()}},
        "steps": steps,
        "ok": not problems,
        "problems": problems,
        "failures": [{**f, "where": where(f["t"])} for f in failures],
        "commands": commands,
    }


# =========================================================================== report


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: dict[str, Any]) -> str:
    rows = []
    for s in res["steps"]:
        by = s["served_by"]
        share = (f"{s['canary']['share_b']:.1%}" if s.get("canary") and s["canary"]["share_b"] is not None
                 else "-")  # a full switch: the A / B mix of its window is in the column before
        rows.append([s["step"], s["expect"], _f(s["cli_ms"]), _f(s["written_ms"]), _f(s.get("store_noticed_ms")),
                     _f(s.get("first_new_ms")), _f(s.get("all_new_ms")), _f(s["requests"]),
                     f"{by['A']:,} / {by['B']:,}", share, _f(s["failed"]), _f(s["rps"]),
                     _f(s["latency_ms"]["p99"]), _f(s["latency_ms"]["max"])])
    m = res["meta"]
    a = m["args"]
    t = res["totals"]
    head = (f"Releases under load: workers {a['workers']}, {a['connections']} keep-alive connections on "
            f"GET {PATH}, {a['duration']:g} s per step; {m['pinning']}. Times in ms after the change "
            f"(the store's version moved; for the canary, the reload call), but \"written\": after the "
            f"command started.\n")
    foot = (f"\nTotal: {t['requests']:,} requests in {m['load_s']:g} s ({_f(t['rps'])} req/s), "
            f"**{t['failed']} failed**; A {t['served_by']['A']:,}, B {t['served_by']['B']:,}, "
            f"unknown {t['served_by']['?']:,}; gateway CPU {m['gateway_cpu_s']} s.")
    return head + "\n" + markdown_table(
        ["step", "expect", "CLI ms", "written ms", "store noticed ms", "first new ms", "100 % ms", "requests", "A / B",
         "canary B share", "failed", "req/s", "p99 ms", "max ms"], rows) + foot


# =========================================================================== CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/release_under_load.py",
        description="Releases under load: deploy, rollback, canary, promote and rollback on "
                    "stage prod during closed-loop load; 0 failed requests expected.",
        epilog=(__doc__ or "").split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=float, default=3.0,
                   help="seconds of load after each step's command returned, and of the baseline (default 3)")
    p.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    p.add_argument("-c", "--connections", type=int, default=32, help="kept-alive connections (default 32)")
    p.add_argument("--canary-percent", type=float, default=10.0, help="the canary's percent (default 10)")
    p.add_argument("--canary-trigger", choices=("admin", "cli", "sighup"), default="admin",
                   help="how the canary's config change is loaded: admin = POST /config/reload (what "
                        "`edgeplane reload --admin` sends), cli = `edgeplane reload --admin` itself (the "
                        "switch is then timed from the command's start), sighup = SIGHUP to the gateway "
                        "(default admin)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the baseline (default 1)")
    p.add_argument("--ports", default="27000-27999", help="LO-HI: the ports to use on 127.0.0.1 "
                                                          "(default 27000-27999)")
    p.add_argument("--tmpdir", default=None, help="where the work dir is made (default: the system's)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", help="full results (default benches/out/release-under-load-<ts>.json)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the configs, the store and every log")
    a = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in a.ports.split("-"))
    except ValueError:
        p.error("--ports takes LO-HI, e.g. 27000-27999")
    if not 1 <= lo <= hi <= 65535 or hi - lo < 3:
        p.error("--ports: a range of at least 4 ports")
    a.ports = (lo, hi)
    if a.duration < MIN_DURATION:
        p.error(f"--duration: at least {MIN_DURATION:g} s (the gateway polls the store every second)")
    if a.workers < 1 or a.connections < 1 or not 0 < a.canary_percent < 100:
        p.error("need --workers >= 1, --connections >= 1, 0 < --canary-percent < 100")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return load_main(argv[1:])
    a = parse_args(argv)
    if a.tmpdir:
        os.makedirs(a.tmpdir, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-release-", dir=a.tmpdir))
    bench = Bench(a, workdir)
    # this controller and the commands it runs share the load core(s)
    res, code = guarded("benches/release_under_load.py", bench.run, bench.procs.close, workdir,
                        keep_workdir=a.keep_workdir, cores=bench.plan.load)
    if code is not None:
        return code
    path = write_json(res, a.json, "release-under-load")
    summary = {k: v for k, v in res.items() if k not in ("failures", "commands")}
    summary["meta"] = {k: v for k, v in res["meta"].items() if k != "prod_history"}
    summary["failures_first"] = res["failures"][:10]
    print(json.dumps(summary, indent=1))
    print()
    print(report(res))
    for f in res["failures"][:15]:
        print(f"  failure: {f['kind']} {f['error'][:160]!r} (connection {f['connection']}, request "
              f"{f['request_on_connection']} on it; {f['where']['step']} +{f['where']['ms_after_change']} ms)")
    print("\n" + ("all checks met: 0 failed requests, every step switched" if res["ok"]
                  else "NOT met:\n  " + "\n  ".join(res["problems"])))
    print(f"\nJSON: {path}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
