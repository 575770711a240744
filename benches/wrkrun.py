"""wrk driver for the bench runner: owns the wrk command line, the Lua script that
sets the request (method, body) and prints the result, and parsing that result into
the same shape `loadgen.py` produces.

wrk calls the script's `done(summary, latency, requests)` once at the end; the script
prints one line `BENCH_RESULT {json}` with the request count, the socket and status
errors, and the latency percentiles (wrk keeps every latency in microseconds).
Keep-alive off is `-H "Connection: close"`: wrk then reconnects for every request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

MARKER = "BENCH_RESULT "

_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %.1f, "p90": %.1f, "p99": %.1f, "p99.9": %.1f, "max": %.1f, "mean": %.1f}, ' ..
    '"cdf_us": [%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, cdf(latency)))
end

function cdf(latency)
  local out = {}
  for _, q in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 99.99}) do
    out[#out + 1] = string.format("[%g, %.1f]", q, latency:percentile(q))
  end
  return table.concat(out, ", ")
end
"""


def find() -> str | None:
    return shutil.which("wrk")


def version(binary: str) -> str:
    try:
        p = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return ((p.stdout + p.stderr).strip().splitlines() or ["unknown"])[0][:100]


def script(method: str, body_size: int) -> str:
    """Lua: the request set-up (if not a plain GET) and the `done` reporter."""
    lines = ["-- written by benches/wrkrun.py"]
    if method != "GET":
        lines.append(f'wrk.method = "{method}"')
    if body_size:
        lines.append(f'wrk.body = string.rep("x", {body_size})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    return "\n".join(lines) + "\n" + _DONE


def argv(binary: str, url: str, *, connections: int, duration: float, threads: int, method: str,
         body_size: int, keepalive: bool, timeout: float, script_dir: Path) -> list[str]:
    path = script_dir / f"wrk-{method.lower()}-{body_size}.lua"
    path.write_text(script(method, body_size))
    cmd = [binary, "-t", str(max(1, min(threads, connections))), "-c", str(connections),
           "-d", f"{max(1, round(duration))}s", "--timeout", f"{max(1, round(timeout))}s", "-s", str(path)]
    if not keepalive:
        cmd += ["-H", "Connection: close"]
    return cmd + [url]


def parse(output: str, connections: int, keepalive: bool) -> dict:
    """wrk's stdout -> the loadgen.py result shape (latencies in ms)."""
    line = next((ln for ln in output.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result line:\n{output[-2000:]}")
    raw = json.loads(line[len(MARKER):])
    duration = raw["duration_us"] / 1e6
    errors = raw["errors"]
    lat = {k: round(v / 1000.0, 4) for k, v in raw["latency_us"].items()}
    return {
        "tool": "wrk", "mode": "closed", "connections": connections, "keepalive": keepalive,
        "duration": round(duration, 3), "requests": raw["requests"], "errors": errors,
        "errors_total": sum(errors.values()),
        "rps": round(raw["requests"] / duration, 1) if duration else 0.0,
        "latency_ms": lat,
        "cdf_ms": [[q, round(us / 1000.0, 4)] for q, us in raw.get("cdf_us", [])],
    }
