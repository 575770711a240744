"""Real worker processes hammering a shared-memory table (tests of `shared_limits` and
`shared_keys`): each child runs `child_code` with argv = table name, worker index, rate,
burst; prints one "ready" line; reads "start end" (monotonic times) from stdin; checks
until `end`; prints one JSON result line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any


def run_workers(child_code: str, table: Any, n_workers: int, seconds: float, rate: float,
                burst: float) -> tuple[list[str], list[dict], float]:
    """(the children's ready lines, their JSON results, the start time they were given).
    The table is closed and unlinked, and every child reaped, whatever happens."""
    procs: list[subprocess.Popen] = []
    try:
        for i in range(n_workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", child_code, table.name, str(i), str(rate), str(burst)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        ready = [p.stdout.readline().strip() for p in procs]
        start = time.monotonic() + 0.1
        end = start + seconds
        for p in procs:
            p.stdin.write(f"{start!r} {end!r}\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            assert p.wait(10) == 0
        return ready, results, start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        table.close()
        table.unlink()
