#!/usr/bin/env python3
"""edgeplane bench runner: owns the orchestration of a bench run.

For each scenario it starts, as separate processes, the demo upstream
(`edgeplane demo-upstream`), the gateway (`edgeplane serve -c <generated config>`)
and a load generator (wrk when installed, else benches/loadgen.py), pinned to
separate cores when the machine has at least 2 (server on core 0; load generator and
upstream on core 1).  It warms up, then measures: requests/s, latency percentiles,
errors, and the server's CPU-seconds over the measured window from /proc (all its
processes), hence CPU per request and requests per CPU-second, plus idle RSS.

`--compare nginx,haproxy,envoy` runs the same scenarios through each peer found, with
configs written to a temp dir and the same pinning, and prints gateway/peer ratios of
requests per CPU-second.  After `plain`, an open-loop run at 50 % of the measured
`plain` throughput (benches/loadgen.py --rate) reports p99 latency from each request's
intended send time.

Output: tables on stdout, and JSON (`--json FILE`, default
benches/out/results-<timestamp>.json).  `--smoke` is the few-second end-to-end check
run by tests/benches/test_bench_smoke.py (Python load generator, plain + mock, tiny load);
it exits 1 when a figure is not sane.  Every child process is stopped in `finally`,
on errors and Ctrl-C alike.

    .venv/bin/python benches/run.py                          # all scenarios, 10 s each
    .venv/bin/python benches/run.py --scenario plain,full --compare nginx,haproxy,envoy
    .venv/bin/python benches/run.py --smoke
    .venv/bin/python benches/run.py --config my.yaml --request "GET /users/7" -H "Authorization: Bearer ..."
    .venv/bin/python benches/run.py --scenario plain --compare nginx --check   # exit 2 when a budget fails
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import peers as peers_mod  # noqa: E402
import report  # noqa: E402
import wrkrun  # noqa: E402
from edgeplane.http import native  # noqa: E402  (provenance: which framer the gateway runs)
from procs import (  # noqa: E402
    CpuPlan,
    Procs,
    cpu_plan,
    cpu_seconds,
    edgeplane_argv,
    free_port,
    rss_bytes,
    wait_http,
    wait_listen,
    write_json,
)
from scenarios import SCENARIOS, Scenario, gateway_config, own, parse_list, request_headers  # noqa: E402

MIB = 1024 * 1024
SMOKE = {"duration": 1.0, "warmup": 0.3, "connections": 4, "openloop_rate_cap": 300.0}
QUICK = {"duration": 3.0, "warmup": 1.0}


@dataclass
class Ctx:
    """Everything a measurement needs besides the target itself."""

    args: argparse.Namespace
    plan: CpuPlan
    procs: Procs
    workdir: Path
    loadgen: str  # "wrk" or "python"
    wrk: str | None
    upstream_port: int = 0
    openloop_rate: float | None = None  # set by the plain run
    upstream: subprocess.Popen | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/run.py",
        description="edgeplane bench runner: demo upstream, gateway and load generator as separate pinned "
                    "processes; requests/s, latency percentiles, errors, gateway CPU per request, idle RSS; "
                    "optionally the same scenarios through nginx, haproxy and Envoy.",
        epilog="Scenarios:\n" + "\n".join(f"  {s.name:<14} {s.summary}" for s in SCENARIOS.values())
        + "\n\nPeers not installed are skipped; install: "
        + "; ".join(f"{k}: {v}" for k, v in peers_mod.INSTALL.items())
        + "\nSee benches/README.md for what each figure means.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-s", "--scenario", default="all", metavar="LIST",
                   help=f"comma-separated scenarios, or all (default): {', '.join(SCENARIOS)}")
    p.add_argument("--compare", default="", metavar="PEERS",
                   help="comma-separated peers to run the same scenarios through: nginx,haproxy,envoy")
    p.add_argument("-d", "--duration", type=float, default=None,
                   help="measured seconds per run (default 10; --quick 3)")
    p.add_argument("--warmup", type=float, default=None,
                   help="warm-up seconds before each measured run (default 2; --quick 1)")
    p.add_argument("-c", "--connections", type=int, default=None, help="client connections (default 64)")
    p.add_argument("--parser", choices=("native", "httptools", "h11"),
                   help="the gateway's request parser (`serve --parser`; default: the config's, native)")
    p.add_argument("-w", "--workers", type=int, default=1,
                   help="gateway worker processes (default 1); peers get the same worker/thread count")
    p.add_argument("--quick", action="store_true", help="short runs: 3 s measured, 1 s warm-up")
    p.add_argument("--smoke", action="store_true",
                   help="few-second end-to-end self-check: Python load generator, plain + mock, tiny load, "
                        "open loop at <= 300 req/s; exits 1 unless requests > 0, errors == 0, CPU/request > 0")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator for closed-loop runs (default auto: wrk if installed, else loadgen.py)")
    p.add_argument("--threads", type=int, default=None, help="wrk threads (default: cores given to the load generator)")
    p.add_argument("--loadgen-processes", type=int, default=None,
                   help="loadgen.py processes (default: cores given to the load generator)")
    p.add_argument("--openloop-rate", type=float, default=None,
                   help="open-loop request rate (default: 50%% of the measured plain throughput)")
    p.add_argument("--no-openloop", action="store_true", help="skip the open-loop run after plain")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the results here (default benches/out/results-<timestamp>.json)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the temp dir with the generated configs and process logs")
    p.add_argument("--config", metavar="FILE",
                   help="benchmark your own config instead of the scenarios: it is served as it is (its "
                        "upstreams must be running; listeners are moved to free loopback ports), with "
                        "--request; peers are not run (they cannot serve your policies)")
    p.add_argument("--request", metavar='"METHOD /path"', default="GET /",
                   help='with --config: the request to send (default "GET /")')
    p.add_argument("-H", "--header", action="append", default=[], metavar='"Name: value"',
                   help="with --config: a request header (repeat it)")
    p.add_argument("--check", action="store_true",
                   help="exit 2 when a budget row that was measured fails")
    p.add_argument("--plot", metavar="DIR",
                   help="write PNG charts there (matplotlib: pip install -e '.[bench]'): req/CPU-s per "
                        "scenario and peer, latency CDFs, and with --growth CPU per request against route count")
    p.add_argument("--growth", metavar="FILE", help="with --plot: a benches/growth.py --json file to chart")
    a = p.parse_args(argv)
    if a.smoke:
        a.duration = a.duration or SMOKE["duration"]
        a.warmup = SMOKE["warmup"] if a.warmup is None else a.warmup
        a.connections = a.connections or SMOKE["connections"]
        a.scenario = "plain,mock" if a.scenario == "all" else a.scenario
        a.loadgen = "python" if a.loadgen == "auto" else a.loadgen
    a.duration = a.duration or (QUICK["duration"] if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (QUICK["warmup"] if a.quick else 2.0)
    a.connections = a.connections or 64
    try:
        a.scenarios = [own(a.config, a.request, a.header)] if a.config else parse_list(a.scenario)
    except ValueError as exc:
        p.error(str(exc))
    if a.config and not Path(a.config).is_file():
        p.error(f"--config {a.config}: no such file")
    a.peers = [n.strip() for n in a.compare.split(",") if n.strip()]
    if a.workers < 1 or a.connections < 1 or a.duration <= 0:
        p.error("--workers, --connections and --duration must be positive")
    return a


# --------------------------------------------------------------------------- load


def run_load(ctx: Ctx, port: int, s: Scenario, duration: float, *, rate: float = 0.0,
             scrape_admin: int | None = None, tool: str | None = None) -> dict:
    """Runs one load generator process (pinned to the load cores) and returns its result."""
    tool = tool or ctx.loadgen
    url = f"http://127.0.0.1:{port}{s.path}"
    out = ctx.workdir / "load.out"
    if tool == "wrk":
        threads = ctx.args.threads or (len(ctx.plan.load) if ctx.plan.load else 1)
        argv = wrkrun.argv(ctx.wrk, url, connections=ctx.args.connections, duration=duration, threads=threads,
                           method=s.method, body_size=s.body_size, keepalive=s.keepalive, timeout=5,
                           script_dir=ctx.workdir)
        for header in request_headers(s, ctx.workdir):
            argv[-1:-1] = ["-H", header]
    else:
        argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), url, "-c", str(ctx.args.connections),
                "-d", str(duration), "-m", s.method, "--body-size", str(s.body_size), "--json", str(out)]
        if rate:
            argv += ["--rate", str(rate)]
        if not s.keepalive:
            argv.append("--no-keepalive")
        for header in request_headers(s, ctx.workdir):
            argv += ["-H", header]
        if ctx.args.loadgen_processes:
            argv += ["-p", str(ctx.args.loadgen_processes)]
    with open(out, "wb") as stdout:
        proc = ctx.procs.start("load", argv, ctx.plan.load, stdout=stdout)
    _wait_load(ctx, proc, duration + 60, scrape_admin)
    text = out.read_text()
    out.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} exited with {proc.returncode}:\n{text[-1500:]}\n{ctx.procs.log_tail('load')}")
    if tool == "wrk":
        return wrkrun.parse(text, ctx.args.connections, s.keepalive)
    return json.loads(text)


def _wait_load(ctx: Ctx, proc: subprocess.Popen, timeout: float, scrape_admin: int | None) -> None:
    """Waits for the load generator; meanwhile scrapes the gateway's telemetry each second if asked."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(1.0)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                ctx.procs.stop(proc)
                raise RuntimeError("load generator did not finish in time") from None
            if scrape_admin:
                for path in ("/metrics", "/upstreams", "/stats"):  # (/metrics is text: read, not parsed)
                    _admin_get(scrape_admin, path)
    ctx.procs.stop(proc)  # reaps it; its group is gone already


def _admin_get(port: int, path: str) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        body = conn.getresponse().read()
        conn.close()
        return json.loads(body)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- one measurement


def measure(ctx: Ctx, target: str, version: str, pid: int, port: int, s: Scenario,
            admin_port: int | None = None) -> dict:
    """Idle RSS, warm-up, then the measured closed-loop window with CPU sampled around it."""
    rss = rss_bytes(pid)
    if ctx.args.warmup > 0:
        run_load(ctx, port, s, ctx.args.warmup)
    time.sleep(0.2)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    load = run_load(ctx, port, s, ctx.args.duration, scrape_admin=admin_port if s.scrape_telemetry else None)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return _result(target, version, s, "closed", load, cpu1 - cpu0, t1 - t0, rss)


def measure_open(ctx: Ctx, target: str, version: str, pid: int, port: int, s: Scenario, rate: float) -> dict:
    time.sleep(0.2)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    load = run_load(ctx, port, s, ctx.args.duration, rate=rate, tool="python")
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    r = _result(target, version, s, "open", load, cpu1 - cpu0, t1 - t0, None)
    lag, p99 = load["send_lag_ms"]["p99"] or 0.0, r["latency_ms"]["p99"] or 0.0
    if lag > 1.0 and lag > 0.5 * p99:
        r["note"] = (f"the load generator itself was late (send lag p99 {lag:.2f} ms of p99 {p99:.2f} ms): "
                     "much of this latency is the load core's, not the server's")
    return r


def _result(target: str, version: str, s: Scenario, kind: str, load: dict, cpu: float, wall: float,
            rss: dict[int, int] | None) -> dict:
    r = {
        "target": target, "version": version, "scenario": s.name, "kind": kind, "peer_mode": s.peer_mode,
        "peer_scenario": s.peer_scenario,
        "requests": load["requests"], "rps": load["rps"], "errors": load["errors"],
        "errors_total": load["errors_total"], "latency_ms": load["latency_ms"], "cdf_ms": load.get("cdf_ms", []),
        **report.derive(cpu, load["requests"], load["duration"]), "cpu_window_s": round(wall, 3),
        "load": {k: v for k, v in load.items()
                 if k not in ("requests", "rps", "errors", "errors_total", "latency_ms", "cdf_ms")},
    }
    if rss is not None:
        r["rss_idle_mib"] = round(sum(rss.values()) / MIB, 1)
        r["rss_idle_per_process_mib"] = [round(v / MIB, 1) for v in rss.values()]
        r["rss_idle_worker_mib"] = round(max(rss.values()) / MIB, 1) if rss else None
    if s.note:
        r["note"] = s.note
    return r


# --------------------------------------------------------------------------- targets




def edgeplane_version() -> str:
    try:
        out = subprocess.run(edgeplane_argv() + ["--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_upstream(ctx: Ctx) -> None:
    ctx.upstream_port = free_port()
    proc = ctx.procs.start("upstream", edgeplane_argv() + ["demo-upstream", "--port", str(ctx.upstream_port)],
                           ctx.plan.load)
    _ready(ctx, "upstream", proc, ctx.upstream_port)
    ctx.upstream = proc


def upstream_died(ctx: Ctx) -> str | None:
    """Why the demo upstream is gone, or None while it runs."""
    code = ctx.upstream.poll()
    if code is None:
        return None
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def run_target(ctx: Ctx, label: str, bench) -> list[dict]:
    """Runs one target; if the demo upstream died meanwhile (something outside the runner
    stopped it), restarts it and runs the target once more, noting it."""
    for attempt in (1, 2):
        try:
            out = bench()
        except RuntimeError:
            if upstream_died(ctx) is None or attempt == 2:
                raise
            out = None
        why = upstream_died(ctx)
        if why is None:
            return out
        note = f"the demo upstream {why} during {label} (not stopped by the runner); restarted it"
        print(f"warning: {note}", file=sys.stderr, flush=True)
        ctx.notes.append(note + (", and ran it again" if attempt == 1 else ""))
        start_upstream(ctx)
    raise RuntimeError(f"the demo upstream keeps dying during {label}")


def _ready(ctx: Ctx, name: str, proc: subprocess.Popen, port: int, expect: int = 200) -> None:
    try:
        wait_http(port, "/2b", proc, expect=expect)
    except RuntimeError as exc:
        raise RuntimeError(f"{name} did not start: {exc}\n{ctx.procs.log_tail(name)}") from None


def bench_gateway(ctx: Ctx, s: Scenario, version: str) -> list[dict]:
    port, admin = free_port(), free_port()
    d = ctx.workdir / f"edgeplane-{s.name}"
    d.mkdir(exist_ok=True)
    cfg_path = d / "edgeplane.yaml"
    sink = None
    otlp_port = free_port() if s.tracing else None
    if otlp_port is not None:  # a stand-in collector, on the load's cores
        sink = ctx.procs.start(f"otlp-sink-{s.name}", [sys.executable, str(BENCH_DIR / "otlp_sink.py"),
                                                       str(otlp_port)], ctx.plan.load)
    name = f"edgeplane-{s.name}"
    if s.config_file is not None:  # the user's own config, on free loopback ports
        argv = ["serve", "-c", s.config_file, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                "-w", str(ctx.args.workers)]
    else:
        cfg = gateway_config(s, port=port, admin_port=admin, upstream_port=ctx.upstream_port,
                             workers=ctx.args.workers, workdir=d, otlp_port=otlp_port)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        argv = ["serve", "-c", str(cfg_path)]
    if ctx.args.parser:
        argv += ["--parser", ctx.args.parser]
    # the gateway's stdout (an access log to stdout) goes to its log file, as under systemd
    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)} if s.function else None  # bench_apps importable
    proc = ctx.procs.start(name, edgeplane_argv() + argv, ctx.plan.server, env=env)
    try:
        if s.config_file is not None:
            wait_listen(port, proc)  # whatever the request answers: the run reports it
        else:
            _ready(ctx, name, proc, port, expect=401 if s.jwt else 200)  # no token: 401 means up
        out = [measure(ctx, report.GATEWAY, version, proc.pid, port, s, admin)]
        _gateway_extras(out[0], admin, d, s)
        if s.name == "plain" and not ctx.args.no_openloop:
            ctx.openloop_rate = _openloop_rate(ctx, out[0])
            out.append(measure_open(ctx, report.GATEWAY, version, proc.pid, port, s, ctx.openloop_rate))
        return out
    finally:
        ctx.procs.stop(proc)
        if sink is not None:
            ctx.procs.stop(sink)


def _gateway_extras(r: dict, admin: int, d: Path, s: Scenario) -> None:
    stats = _admin_get(admin, "/stats")
    if stats is not None:
        r["admin_stats"] = stats
    if s.access_log == "file":
        time.sleep(1.0)  # the access log flushes every 500 ms
        log = d / "access.log"
        r["access_log_lines"] = sum(1 for _ in log.open("rb")) if log.exists() else 0


def _openloop_rate(ctx: Ctx, closed: dict) -> float:
    if ctx.args.openloop_rate:
        return ctx.args.openloop_rate
    rate = round(closed["rps"] * 0.5)
    if ctx.args.smoke:
        rate = min(rate, SMOKE["openloop_rate_cap"])
    return max(rate, 10.0)


def bench_peer(ctx: Ctx, peer: peers_mod.Peer, s: Scenario) -> list[dict]:
    port = free_port()
    run = peer.prepare(ctx.workdir / f"{peer.name}-{s.name}", port, ctx.upstream_port, s.peer_mode,
                       ctx.args.workers)
    name = f"{peer.name}-{s.name}"
    proc = ctx.procs.start(name, run.argv, ctx.plan.server)
    try:
        _ready(ctx, name, proc, port)
        out = [measure(ctx, peer.name, peer.version, proc.pid, port, s)]
        rate = ctx.openloop_rate
        if s.name == "plain" and rate and not ctx.args.no_openloop:
            out.append(measure_open(ctx, peer.name, peer.version, proc.pid, port, s, rate))
        return out
    finally:
        ctx.procs.stop(proc)


# --------------------------------------------------------------------------- run


def machine() -> dict:
    model = "unknown"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "hostname": platform.node()}


def find_peers(ctx: Ctx) -> tuple[list[peers_mod.Peer], list[dict]]:
    found, skipped = [], []
    for name in ctx.args.peers:
        p = peers_mod.find(name)
        if isinstance(p, str):
            skipped.append({"peer": name, "reason": p})
            print(f"peer {name}: skipped: {p}", flush=True)
        else:
            found.append(p)
            print(f"peer {name}: {p.version} ({p.binary})", flush=True)
    return found, skipped


def choose_loadgen(args: argparse.Namespace) -> tuple[str, str | None]:
    wrk = wrkrun.find()
    if args.loadgen == "wrk" and wrk is None:
        sys.exit("benches/run.py: --loadgen wrk: wrk is not installed (apt-get install -y wrk)")
    if args.loadgen == "python" or wrk is None:
        return "python", wrk
    return "wrk", wrk


def execute(ctx: Ctx) -> dict:
    args = ctx.args
    version = edgeplane_version()
    found, skipped = find_peers(ctx)
    print(f"pinning: {ctx.plan.note}", flush=True)
    print(f"load generator: {ctx.loadgen}" + (f" ({wrkrun.version(ctx.wrk)})" if ctx.loadgen == "wrk" else
                                            " (benches/loadgen.py)"), flush=True)
    start_upstream(ctx)
    results: list[dict] = []
    for s in args.scenarios:
        if s.note:
            print(s.note, flush=True)
            ctx.notes.append(s.note)
        print(f"running {s.name}: edgeplane ...", flush=True)
        results += run_target(ctx, f"{s.name} through edgeplane", lambda s=s: bench_gateway(ctx, s, version))
        if s.peer_mode is None:
            continue
        for peer in found:
            why_not = peers_mod.UNSUPPORTED.get((peer.name, s.peer_mode))
            if why_not is not None:
                print(f"{s.name}: {peer.name} not run: {why_not}", flush=True)
                ctx.notes.append(f"{s.name}: {peer.name} not run: {why_not}")
                continue
            print(f"running {s.name}: {peer.name} ...", flush=True)
            results += run_target(ctx, f"{s.name} through {peer.name}", lambda peer=peer, s=s: bench_peer(ctx, peer, s))
    ratio_rows = report.ratios(results, [p.name for p in found])
    return {
        "meta": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "edgeplane": version,
            "pinning": ctx.plan.note, "server_cores": sorted(ctx.plan.server or []),
            "load_cores": sorted(ctx.plan.load or []), "load_generator": ctx.loadgen,
            "wrk": wrkrun.version(ctx.wrk) if ctx.wrk else None,
            "peers": {p.name: {"version": p.version, "binary": p.binary} for p in found},
            "args": {k: v for k, v in vars(args).items() if k not in ("scenarios",)},
            "openloop_rate": ctx.openloop_rate,
            "provenance": provenance(),
        },
        "notes": ctx.notes, "skipped": skipped, "results": results, "ratios": ratio_rows,
        "budget": report.budget(results, ratio_rows),
    }


def provenance() -> dict:
    """What produced the figures: the commit, Python and the hot path's libraries."""
    def version_of(dist: str) -> str | None:
        try:
            return importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            return None
    commit = dirty = None
    try:
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "dirty": dirty, "python": platform.python_version(),
            "uvloop": version_of("uvloop"), "httptools": version_of("httptools"),
            "hot_path": "compiled" if native.COMPILED else native.WHY}


LEGEND = """legend:
  req/CPU-s    requests answered per second of the server's CPU time (user + system, every
               process of the server) over the measured window: the main figure, as it does not
               depend on how many cores the server was given
  us CPU/req   the same the other way round: microseconds of server CPU per request
  CPU util     server CPU seconds / wall seconds (1.0 = one core busy)
  ratio        gateway req/CPU-s / peer req/CPU-s for the same scenario, in the same run"""
OPEN_LEGEND = """  open loop    requests are sent at a fixed rate whatever the answers (benches/loadgen.py --rate),
               and latency is measured from each request's intended send time, so a stall
               shows up as the latency of every request it delayed (no coordinated omission)
  send lag     p99 of how late the generator itself sent a request (its own noise)
  waited       requests that had to wait for a free connection before they could be sent"""


def print_report(data: dict) -> None:
    print()
    print(report.results_table(data["results"]))
    if data["ratios"]:
        print("\nRequests per CPU-second, gateway / peer:")
        print(report.ratios_table(data["ratios"]))
    if any(r.get("kind") == "open" for r in data["results"]):
        print(f"\nOpen loop at {data['meta']['openloop_rate']:.0f} req/s (latency from intended send time):")
        print(report.openloop_table(data["results"]))
    print()
    print(LEGEND)
    if any(r.get("kind") == "open" for r in data["results"]):
        print(OPEN_LEGEND)
    prov = data["meta"].get("provenance") or {}
    dirty = " (uncommitted changes)" if prov.get("dirty") else ""
    print(f"\nprovenance: commit {prov.get('commit') or 'unknown'}{dirty}, Python {prov.get('python')}, "
          f"uvloop {prov.get('uvloop')}, httptools {prov.get('httptools')}, hot path: {prov.get('hot_path')}")
    for s in data["skipped"]:
        print(f"\nskipped {s['peer']}: {s['reason']}")
    for r in data["results"]:
        if r.get("kind") == "open" and r.get("note"):
            print(f"\nnote: {r['target']} open loop: {r['note']}")
    for n in data["notes"]:
        print(f"\nnote: {n}")
    if not data["meta"]["args"]["smoke"]:
        print("\nBudget:")
        print(report.budget_table(data["budget"]))


def failed_budget_rows(data: dict) -> list[str]:
    """The budget rows that were measured and failed (`--check`)."""
    return [f"{row['row']}: {row['measured']} (budget {row['budget']})" for row in data.get("budget") or []
            if row.get("met") is False]


def smoke_check(data: dict) -> list[str]:
    failures = []
    for r in data["results"]:
        if r["target"] != report.GATEWAY:
            continue
        tag = f"{r['scenario']} ({r['kind']})"
        if not r["requests"] > 0:
            failures.append(f"{tag}: no requests")
        if r["errors_total"] != 0:
            failures.append(f"{tag}: {r['errors_total']} errors {r['errors']}")
        if r["kind"] == "closed" and not (r["cpu_us_per_req"] or 0) > 0:
            failures.append(f"{tag}: CPU per request is {r['cpu_us_per_req']}")
    return failures




def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (background jobs)
        signal.signal(sig, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-bench-"))
    loadgen, wrk = choose_loadgen(args)
    ctx = Ctx(args, cpu_plan(args.workers, pin=not args.no_pin), Procs(workdir), workdir, loadgen, wrk)
    try:
        data = execute(ctx)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"benches/run.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        ctx.procs.close()
        if args.keep_workdir:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.smoke:
        failures = smoke_check(data)
        data["smoke"] = {"ok": not failures, "failures": failures}
    print_report(data)
    path = write_json(data, args.json, "results")
    print(f"\nJSON: {path}")
    if args.plot:
        import plots

        try:
            written = plots.write(data, Path(args.plot), growth=json.loads(Path(args.growth).read_text())
                                  if args.growth else None)
            print("charts: " + ", ".join(str(p) for p in written))
        except ImportError:
            print("charts: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    if args.smoke:
        print("smoke: " + ("OK" if data["smoke"]["ok"] else "FAILED: " + "; ".join(data["smoke"]["failures"])))
        return 0 if data["smoke"]["ok"] else 1
    if args.check:
        failed = failed_budget_rows(data)
        print("check: " + ("every measured budget row is met" if not failed else "FAILED: " + "; ".join(failed)))
        return 2 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
