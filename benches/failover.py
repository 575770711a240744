#!/usr/bin/env python3
"""Upstream failure scenarios (issue: upstream resilience): what a client sees when one
of three targets is dead or sometimes slow, through edgeplane, nginx and Envoy, each
configured with its own passive health checks and retries.

Scenarios (`--scenario`, default both):

- `dead-target`: three targets, the second a loopback port nothing listens on (every
  connect is refused at once). No warm-up: the interesting part is the first second,
  before the dead target is taken out.
- `slow-5pct`: three live targets; the second answers every 20th request it gets (5 %
  of its requests, about 1.7 % of all) after 2 s, the others at once. It is the demo
  upstream with one change (`_slow-upstream`, below): its protocol class is subclassed
  so that every `--slow-every`-th response goes through the demo upstream's own delayed
  send (`/delay/{ms}`'s path) instead of being written at once. Same bytes (`ok`),
  deterministic count. Read its req/s with care: in a closed loop a slow answer holds
  its client connection, and with 1 request in 60 slow every connection is waiting on
  one within about 2,000 requests, so throughput is set by how long a slow answer is
  waited for (2 s, or a timeout) and whether the slow target is taken out, not by the
  gateway's speed (req/CPU-s at a few hundred req/s is mostly fixed costs).

Gateways and their settings (one worker / one thread each):

- **edgeplane**: the `plain` config of benches/scenarios.py with three targets and the
  README's settings: `outlier_detection: {consecutive_connect_failures: 1,
  consecutive_5xx: 5, base_ejection_time: 30s}`, `retries: {retry_on: [connect-failure,
  reset], attempts: 2}` (backoff, retry budget: defaults). Variants: `retry-budget-1.0`
  (dead-target): `retries.budget: 1.0`, retries in flight up to the requests in flight
  (the default 0.2 refuses some of the retries of a cold start's burst: 502s);
  `per-try-1s` (slow-5pct): `retries: {retry_on: [connect-failure, reset, 504],
  per_try_timeout: 1s}` and `consecutive_5xx: 1`: a try that waits 1 s for its head is
  retried on another target, and the slow target is ejected (as nginx's
  `proxy_read_timeout` and Envoy's `per_try_timeout` variants do).
- **nginx**: benches/peers.py's proxy config, the upstream's servers with `max_fails=1
  fail_timeout=30s`, `proxy_next_upstream error timeout`, `proxy_next_upstream_tries 2`.
  Variant `read-1s`: `proxy_read_timeout 1s` (nginx's per-try timeout: a timed-out try
  goes to the next server and counts as a failure of the slow one).
- **Envoy**: benches/peers.py's proxy config, the cluster with three endpoints and
  `outlier_detection: {consecutive_5xx: 5, consecutive_gateway_failure: 1,
  enforcing_consecutive_gateway_failure: 100, base_ejection_time: 30s,
  max_ejection_percent: 50}`, the route with `retry_policy: {retry_on:
  "connect-failure,reset", num_retries: 1, retry_host_predicate: previous_hosts}` and an
  admin listener (its counters are read after the run). Variants: `retry-budget-100%`
  (dead-target): `circuit_breakers: {thresholds: [{retry_budget: {budget_percent: 100,
  min_retry_concurrency: 3}}]}` instead of the default `max_retries: 3` breaker;
  `per-try-1s` (slow-5pct): `per_try_timeout: 1s` (a timed-out try is retried on another
  host). `--no-tuned` runs the defaults only.

Processes (each in its own process group, pinned like benches/run.py with
`procs.cpu_plan(1)`: the gateway on the server core; the upstreams, this controller and
its client on the other core(s)): two demo upstreams (`edgeplane demo-upstream`), the
slow upstream (this file, `_slow-upstream`), and, one at a time, each gateway. The
client runs in this process: `--connections` kept-alive connections in a closed loop
(`GET /2b`, wait for the answer, next), for `--duration` s or until `--requests` have been
sent; requests in flight at the end are waited for (at most `--timeout`). Every request
is recorded: send time, latency, and its status or what went wrong (connection refused,
closed before the answer, timeout; the connection is then opened anew).

Figures per gateway: answers, req/s, client-visible errors (non-2xx answers and
connection errors, by kind, with the times of the first and last), p50/p99/max latency,
answers taking 0.5 s or more, the gateway's CPU-seconds over the load (utime+stime of its
process tree, `procs.cpu_seconds`) and requests per CPU-second; plus what the gateway
says it did (edgeplane `/upstreams`: ejections, retries; Envoy's admin counters; nginx's
error log lines). Output: a markdown table per scenario and a JSON summary on stdout;
`--json FILE` writes the JSON with every error's send time and latency (the first 1,000).

    .venv/bin/python benches/failover.py                                  # both scenarios, nginx + Envoy
    .venv/bin/python benches/failover.py --scenario dead-target --compare nginx --duration 5
    .venv/bin/python benches/failover.py --ports 27000-27999 --scratch /tmp/failover --json /tmp/failover/out.json

Envoy is found as benches/peers.py finds it (`$ENVOY_BIN`, the `envoy` package, `envoy`
on PATH). Every child is stopped when the run ends, on errors and Ctrl-C alike.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import peers as peers_mod  # noqa: E402
from procs import (  # noqa: E402
    Ports,
    Procs,
    cpu_plan,
    cpu_seconds,
    edgeplane_argv,
    guarded,
)
from reload_under_load import Cut, _connect, _exchange, _kind, lat_summary  # noqa: E402
from scenarios import SCENARIOS, gateway_config  # noqa: E402

SCENARIO_NAMES = ("dead-target", "slow-5pct")
PEERS = ("nginx", "envoy")
PATH = "/2b"
SLOW_MS = 2000
SLOW_EVERY = 20
TUNED_TIMEOUT = "1s"
TUNED = {  # (scenario, gateway) -> the one variant run besides the defaults (module docstring)
    ("dead-target", "edgeplane"): "retry-budget-1.0",
    ("dead-target", "envoy"): "retry-budget-100%",
    ("slow-5pct", "edgeplane"): "per-try-1s",
    ("slow-5pct", "nginx"): "read-1s",
    ("slow-5pct", "envoy"): "per-try-1s",
}


# =========================================================================== slow upstream


def slow_upstream_main(argv: list[str]) -> int:
    """The demo upstream, every `--every`-th answer sent after `--delay-ms` (its own
    delayed-send path, the one `/delay/{ms}` uses). Prints its counts on exit."""
    p = argparse.ArgumentParser(prog="failover.py _slow-upstream")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--every", type=int, default=SLOW_EVERY)
    p.add_argument("--delay-ms", type=int, default=SLOW_MS)
    a = p.parse_args(argv)
    from edgeplane.runtime import demo_upstream

    counter = itertools.count(1)
    counts = {"requests": 0, "delayed": 0}

    class SlowProtocol(demo_upstream._DemoProtocol):
        def on_message_complete(self) -> None:
            if not self._closing:
                n = next(counter)
                counts["requests"] = n
                self.slow_next = n % a.every == 0
            super().on_message_complete()

        def _send(self, data: bytes, close: bool = False) -> None:
            if getattr(self, "slow_next", False):
                self.slow_next = False
                counts["delayed"] += 1
                self._delayed(data, a.delay_ms / 1000.0, close)
            else:
                super()._send(data, close)

    demo_upstream._DemoProtocol = SlowProtocol  # DemoUpstream.start() builds its protocols from this name
    try:
        return demo_upstream.main(["--host", "127.0.0.1", "--port", str(a.port)])
    finally:
        print(f"slow upstream: {counts['requests']} requests, {counts['delayed']} delayed "
              f"{a.delay_ms} ms", file=sys.stderr, flush=True)


# =========================================================================== ports




# =========================================================================== client


async def closed_loop(port: int, connections: int, duration: float, max_requests: int | None,
                      timeout: float) -> dict:
    """`connections` kept-alive clients, closed loop on GET PATH; every request recorded
    as (send time since start s, latency s, status or error kind)."""
    loop = asyncio.get_running_loop()
    req = f"GET {PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    rows: list[tuple[float, float, int | str]] = []
    sent = itertools.count(1)
    t0 = time.perf_counter()
    end = t0 + duration

    async def client() -> None:
        sock = None
        while time.perf_counter() < end and (max_requests is None or next(sent) <= max_requests):
            t_send = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    if sock is None:
                        sock = await _connect(loop, port)
                    status, _, keep = await _exchange(loop, sock, req)
            except (OSError, Cut, TimeoutError) as exc:
                rows.append((t_send - t0, time.perf_counter() - t_send, _kind(exc)))
                if sock is not None:
                    sock.close()
                    sock = None
                if isinstance(exc, ConnectionRefusedError):  # the gateway itself is not there
                    await asyncio.sleep(0.01)
                continue
            rows.append((t_send - t0, time.perf_counter() - t_send, status))
            if not keep:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return {"rows": rows, "elapsed": time.perf_counter() - t0}


def summarize(load: dict) -> dict:
    rows, elapsed = load["rows"], load["elapsed"]
    errors: dict[str, int] = {}
    error_times: list[float] = []
    detail: list[list] = []
    for t, dt, what in rows:
        if not (isinstance(what, int) and 200 <= what < 300):
            key = str(what)
            errors[key] = errors.get(key, 0) + 1
            error_times.append(t)
            detail.append([round(t, 4), round(dt * 1e3, 2), key])
    lat = lat_summary([dt for _, dt, _ in rows])
    return {
        "requests": len(rows), "elapsed_s": round(elapsed, 3), "rps": round(len(rows) / elapsed, 1),
        "errors_total": len(error_times), "errors": dict(sorted(errors.items())),
        "first_error_s": round(min(error_times), 3) if error_times else None,
        "last_error_s": round(max(error_times), 3) if error_times else None,
        "errors_detail": sorted(detail)[:1000],  # [sent at s, latency ms, status or kind], the first 1,000
        "latency_ms": {k: lat[k] for k in ("p50", "p99", "max")},
        "over_500ms": sum(1 for _, dt, _ in rows if dt >= 0.5),
    }


# =========================================================================== gateways


@dataclass
class Gateway:
    name: str
    version: str
    peer: peers_mod.Peer | None = None  # None: edgeplane


def edgeplane_config(port: int, admin: int, targets: list[int], variant: str, d: Path) -> dict:
    cfg = gateway_config(SCENARIOS["plain"], port=port, admin_port=admin, upstream_port=targets[0],
                         workers=1, workdir=d)
    (name, up), = cfg["upstreams"].items()
    up["targets"] = [f"http://127.0.0.1:{t}" for t in targets]
    up["outlier_detection"] = {"consecutive_connect_failures": 1, "consecutive_5xx": 5, "base_ejection_time": "30s"}
    up["retries"] = {"retry_on": ["connect-failure", "reset"], "attempts": 2}
    if variant == "per-try-1s":
        up["retries"] = {"retry_on": ["connect-failure", "reset", 504], "attempts": 2,
                         "per_try_timeout": TUNED_TIMEOUT}
        up["outlier_detection"]["consecutive_5xx"] = 1
    elif variant == "retry-budget-1.0":
        up["retries"]["budget"] = 1.0
    return cfg


def _swap(text: str, old: str, new: str, who: str) -> str:
    if old not in text:
        raise RuntimeError(f"benches/peers.py's {who} config changed: '{old.strip()}' not found")
    return text.replace(old, new, 1)


def nginx_config(text: str, first: int, targets: list[int], variant: str) -> str:
    servers = "".join(f"        server 127.0.0.1:{t} max_fails=1 fail_timeout=30s;\n" for t in targets)
    text = _swap(text, f"        server 127.0.0.1:{first};\n", servers, "nginx")
    extra = ("            proxy_next_upstream error timeout;\n"
             "            proxy_next_upstream_tries 2;\n"
             + (f"            proxy_read_timeout {TUNED_TIMEOUT};\n" if variant == "read-1s" else ""))
    return _swap(text, "proxy_pass http://up;\n", "proxy_pass http://up;\n" + extra, "nginx")


def envoy_config(text: str, first: int, targets: list[int], variant: str, admin: int) -> str:
    retry = ('{retry_on: "connect-failure,reset", num_retries: 1, host_selection_retry_max_attempts: 3, '
             "retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: "
             '{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]'
             + (f", per_try_timeout: {TUNED_TIMEOUT}" if variant == "per-try-1s" else "") + "}")
    text = _swap(text, "route: {cluster: up}", f"route: {{cluster: up, retry_policy: {retry}}}", "Envoy")
    endpoint = "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n"
    text = _swap(text, endpoint.format(first), "".join(endpoint.format(t) for t in targets), "Envoy")
    text = _swap(text, "    connect_timeout: 5s\n",
                 "    connect_timeout: 5s\n"
                 "    outlier_detection: {consecutive_5xx: 5, consecutive_gateway_failure: 1, "
                 "enforcing_consecutive_gateway_failure: 100, base_ejection_time: 30s, max_ejection_percent: 50}\n"
                 + ("    circuit_breakers: {thresholds: [{retry_budget: {budget_percent: {value: 100.0}, "
                    "min_retry_concurrency: 3}}]}\n" if variant == "retry-budget-100%" else ""),
                 "Envoy")
    return _swap(text, "static_resources:\n",
                 f"admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}\n"
                 "static_resources:\n", "Envoy")


def _get(port: int, path: str) -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", path)
        body = conn.getresponse().read()
        conn.close()
        return body.decode(errors="replace")
    except OSError:
        return None


def edgeplane_report(admin: int) -> dict | None:
    text = _get(admin, "/upstreams")
    if text is None:
        return None
    try:
        ups = json.loads(text)["upstreams"]
    except (ValueError, KeyError):
        return None
    up = ups[0] if isinstance(ups, list) else next(iter(ups.values()))
    return {
        "retries": up.get("retries"),
        "targets": [{"target": t.get("target", t.get("name")), "health": t.get("health"),
                     "requests": t.get("requests"), "connect_failures": t.get("connect_failures"),
                     "ejections": (t.get("outlier") or {}).get("ejections")} for t in up.get("targets", [])],
    }


ENVOY_COUNTERS = re.compile(r"^cluster\.up\.(outlier_detection\.ejections_enforced_total|"
                            r"outlier_detection\.ejections_active|upstream_rq_retry|upstream_rq_retry_success|"
                            r"upstream_rq_retry_overflow|upstream_cx_connect_fail|upstream_rq_per_try_timeout|"
                            r"upstream_rq_timeout|upstream_rq_5xx|upstream_rq_total): (\d+)$")


def envoy_report(admin: int) -> dict | None:
    text = _get(admin, "/stats")
    if text is None:
        return None
    return {m.group(1): int(m.group(2)) for ln in text.splitlines() if (m := ENVOY_COUNTERS.match(ln))}


def nginx_report(error_log: Path) -> dict:
    try:
        text = error_log.read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for key, needle in (("connect_failed", "connect() failed"), ("timed_out", "upstream timed out"),
                        ("server_disabled", "upstream server temporarily disabled"),
                        ("no_live_upstreams", "no live upstreams")):
        out[key] = text.count(needle)
    return out


# =========================================================================== the run


class Bench:
    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a = a
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.plan = cpu_plan(1, pin=not a.no_pin)
        self.ports = Ports(a.ports)
        self.skipped: list[dict] = []
        self.notes: list[str] = []

    def start(self, name: str, argv: list[str], cores, port: int, path: str | None = PATH) -> subprocess.Popen:
        """Starts `argv` and waits until GET `path` on `port` answers 200 (`path` None: until
        `port` accepts a connection)."""
        return self.procs.start_ready(name, argv, cores, port, path)

    def gateways(self) -> list[Gateway]:
        out = [Gateway("edgeplane", _edgeplane_version())]
        for name in self.a.peers:
            p = peers_mod.find(name)
            if isinstance(p, str):
                self.skipped.append({"gateway": name, "reason": p})
                print(f"{name}: skipped: {p}", flush=True)
            else:
                out.append(Gateway(name, p.version, p))
                print(f"{name}: {p.version} ({p.binary})", flush=True)
        return out

    def run(self) -> dict:
        a = self.a
        print(f"pinning: {self.plan.note}", flush=True)
        gws = self.gateways()
        fast = [self.ports.get(), self.ports.get()]
        for i, port in enumerate(fast):
            self.start(f"upstream-{i + 1}", edgeplane_argv() + ["demo-upstream", "--port", str(port)],
                       self.plan.load, port)
        results = []
        for scen in a.scenarios:
            if scen == "dead-target":
                third = self.ports.get()  # checked free, and nobody is started on it
                slow = None
            else:
                third = self.ports.get()
                # probed with a TCP connect: a request would count toward its every-Nth
                slow = self.start("slow-upstream", [sys.executable, str(Path(__file__).resolve()), "_slow-upstream",
                                                    "--port", str(third), "--every", str(a.slow_every),
                                                    "--delay-ms", str(a.slow_ms)], self.plan.load, third, None)
            targets = [fast[0], third, fast[1]]
            for gw in gws:
                for variant in ("default", TUNED.get((scen, gw.name))) if a.tuned else ("default",):
                    if variant is None:
                        continue
                    label = gw.name if variant == "default" else f"{gw.name} ({variant})"
                    print(f"running {scen}: {label} ...", flush=True)
                    try:
                        r = self.one(scen, gw, variant, targets)
                    except RuntimeError as exc:
                        if gw.peer is None:
                            raise
                        why = str(exc)
                        print(f"{label}: failed, skipped: {why}", file=sys.stderr, flush=True)
                        self.skipped.append({"gateway": label, "scenario": scen, "reason": why})
                        continue
                    r.update(scenario=scen, gateway=gw.name, variant=variant, version=gw.version)
                    results.append(r)
            if slow is not None:
                self.procs.stop(slow)
                time.sleep(0.1)
                m = re.search(r"slow upstream: (\d+) requests, (\d+) delayed", self.procs.log_tail("slow-upstream", 3))
                if m:
                    self.notes.append(f"slow-5pct: the slow target got {m.group(1)} requests in all (every gateway "
                                      f"and variant), {m.group(2)} of them answered after {a.slow_ms} ms")
        return {
            "meta": {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pinning": self.plan.note,
                     "server_cores": sorted(self.plan.server or []), "load_cores": sorted(self.plan.load or []),
                     "args": {k: v for k, v in vars(a).items() if k not in ("scenarios",)},
                     "gateways": {g.name: g.version for g in gws}},
            "results": results, "skipped": self.skipped, "notes": self.notes,
        }

    def one(self, scen: str, gw: Gateway, variant: str, targets: list[int]) -> dict:
        a = self.a
        port, admin = self.ports.get(), self.ports.get()
        name = f"{gw.name}-{scen}" + ("" if variant == "default" else "-tuned")
        d = self.workdir / name
        d.mkdir()
        extra: dict = {}
        if gw.peer is None:
            cfg_path = d / "edgeplane.yaml"
            cfg_path.write_text(json.dumps(edgeplane_config(port, admin, targets, variant, d), indent=2) + "\n")
            argv = edgeplane_argv() + ["serve", "-c", str(cfg_path)]
        else:
            run = gw.peer.prepare(d, port, targets[0], "proxy", 1)
            text = run.config_path.read_text()
            if gw.name == "nginx":
                text = nginx_config(text, targets[0], targets, variant)
            else:
                text = envoy_config(text, targets[0], targets, variant, admin)
            run.config_path.write_text(text)
            argv = run.argv
        # ready: asked on the admin listener (edgeplane, Envoy) or by a TCP connect (nginx), never
        # with a request through the gateway, which could find the dead target before the load does
        proc = self.start(name, argv, self.plan.server, admin if gw.name != "nginx" else port,
                          None if gw.name == "nginx" else "/ready")
        try:
            time.sleep(0.2)
            cpu0 = cpu_seconds(proc.pid)
            load = _run_loop(closed_loop(port, a.connections, a.duration, a.requests, a.timeout))
            cpu1 = cpu_seconds(proc.pid)
            if gw.peer is None:
                extra["edgeplane_upstreams"] = edgeplane_report(admin)
            elif gw.name == "envoy":
                extra["envoy_counters"] = envoy_report(admin)
            else:
                extra["nginx_error_log"] = nginx_report(d / "error.log")
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during the run")
        finally:
            self.procs.stop(proc)
        r = summarize(load)
        cpu = cpu1 - cpu0
        r.update(cpu_s=round(cpu, 3), req_per_cpu_s=round(r["requests"] / cpu) if cpu > 0 else None, **extra)
        if gw.peer is None and scen == "dead-target":
            r["gateway_log_warnings"] = [ln for ln in self.procs.log_tail(name, 40).splitlines()
                                         if "eject" in ln or "WARNING" in ln][:10]
        return r


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a project dependency
        return asyncio.run(coro)
    return uvloop.run(coro)




def _edgeplane_version() -> str:
    try:
        out = subprocess.run(edgeplane_argv() + ["--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# =========================================================================== report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(results: list[dict], scen: str) -> str:
    head = ["gateway", "settings", "answers", "req/s", "errors", "error kinds", "first/last error s",
            "p50 ms", "p99 ms", "max ms", ">= 0.5 s", "CPU s", "req/CPU-s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["scenario"] != scen:
            continue
        kinds = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        when = f"{r['first_error_s']:.3f} / {r['last_error_s']:.3f}" if r["errors_total"] else "-"
        lat = r["latency_ms"]
        cells = [r["gateway"], r["variant"], r["requests"], r["rps"], r["errors_total"], kinds, when,
                 lat["p50"], lat["p99"], lat["max"], r["over_500ms"], r["cpu_s"], r["req_per_cpu_s"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def summary_json(data: dict) -> dict:
    keep = ("scenario", "gateway", "variant", "requests", "rps", "errors_total", "errors", "first_error_s",
            "last_error_s", "latency_ms", "over_500ms", "cpu_s", "req_per_cpu_s", "edgeplane_upstreams",
            "envoy_counters", "nginx_error_log")
    return {"meta": data["meta"], "results": [{k: r[k] for k in keep if k in r} for r in data["results"]],
            "skipped": data["skipped"], "notes": data["notes"]}


def print_report(data: dict) -> None:
    a = data["meta"]["args"]
    for scen in a["scenario_list"]:
        print(f"\n### {scen} ({a['connections']} connections, {a['duration']} s"
              + (f", at most {a['requests']} requests" if a["requests"] else "") + ")\n")
        print(markdown(data["results"], scen))
    for s in data["skipped"]:
        print(f"\nskipped {s['gateway']}: {s['reason']}")
    for n in data["notes"]:
        print(f"\nnote: {n}")
    print("\nJSON summary:")
    print(json.dumps(summary_json(data), indent=1))


# =========================================================================== main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benches/failover.py",
        description="Upstream failure scenarios through edgeplane, nginx and Envoy: one dead target of three, "
                    "and a target answering 5 % of its requests after 2 s. Client-visible errors, latency and "
                    "requests per gateway CPU-second.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-s", "--scenario", default="all", metavar="LIST",
                   help=f"comma-separated: {', '.join(SCENARIO_NAMES)}, or all (default)")
    p.add_argument("--compare", default="nginx,envoy", metavar="PEERS",
                   help="peers to run besides edgeplane: nginx,envoy (default both; '' for none)")
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds of load per gateway (default 5)")
    p.add_argument("-c", "--connections", type=int, default=32, help="client connections (default 32)")
    p.add_argument("-n", "--requests", type=int, default=None,
                   help="stop after this many requests (and at --duration at the latest)")
    p.add_argument("--timeout", type=float, default=5.0, help="client timeout per request, s (default 5)")
    p.add_argument("--slow-every", type=int, default=SLOW_EVERY,
                   help=f"slow-5pct: the slow target delays every Nth answer (default {SLOW_EVERY}: 5 %%)")
    p.add_argument("--slow-ms", type=int, default=SLOW_MS, help=f"slow-5pct: the delay, ms (default {SLOW_MS})")
    p.add_argument("--ports", metavar="LO-HI", default=None,
                   help="take every port from this range (default: any free port)")
    p.add_argument("--scratch", metavar="DIR", default=None,
                   help="parent of the temp work dir (configs, logs; default: the system's temp dir)")
    p.add_argument("--no-tuned", dest="tuned", action="store_false",
                   help="run the default settings only, not the tuned variant of each gateway")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the JSON (with each error's send time and latency) here")
    p.add_argument("--keep-workdir", action="store_true", help="keep the work dir with the configs and logs")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.scenario.split(",") if n.strip()]
    a.scenario_list = list(SCENARIO_NAMES) if names == ["all"] else names
    bad = [n for n in a.scenario_list if n not in SCENARIO_NAMES]
    if bad:
        p.error(f"unknown scenario(s) {', '.join(bad)} (known: {', '.join(SCENARIO_NAMES)}, all)")
    a.scenarios = a.scenario_list
    a.peers = [n.strip() for n in a.compare.split(",") if n.strip()]
    if any(n not in PEERS for n in a.peers):
        p.error(f"--compare: known peers are {', '.join(PEERS)}")
    if a.connections < 1 or a.duration <= 0 or a.slow_every < 1:
        p.error("--connections, --duration and --slow-every must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_slow-upstream"]:
        return slow_upstream_main(argv[1:])
    a = parse_args(argv)
    if a.scratch:
        Path(a.scratch).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="edgeplane-failover-", dir=a.scratch))
    bench = Bench(a, workdir)
    data, code = guarded("benches/failover.py", bench.run, bench.procs.close, workdir,
                         keep_workdir=a.keep_workdir, cores=bench.plan.load)
    if code is not None:
        return code
    print_report(data)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
