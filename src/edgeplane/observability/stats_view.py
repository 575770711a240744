"""`GET /stats` as one view of every worker, with a per-worker breakdown on request.

Owns the merge of the workers' `/stats` documents. Each worker writes its own
(`Gateway.stats()`) beside its metrics file once a second (`stats-<index>.json`); the
worker that answers writes its own first, reads the others' and merges:

- numbers are summed (counters, and gauges such as `connections_open`);
- `keys` (the size of a JWKS key set, the same in every worker) is the largest;
- `last` (a reload's outcome) is the newest, by its `at`;
- `refused_by_supervisor` (one supervisor's file, shown by every worker) is the
  answering worker's;
- anything else (strings, lists) is the answering worker's, and so is `pid`; `pids`
  and `workers` say whose counts are in the sums.

Only workers that are alive count. The counters are each worker's since it started:
`/metrics` is the view whose counters survive a worker's restart.
"""

from __future__ import annotations

import json
import os
from typing import Any

from edgeplane.observability.aggregate import write_json
from edgeplane.runtime.systemd import alive

_OWN = {"refused_by_supervisor"}


def _path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"stats-{index}.json")


def write(run_dir: str, index: int, stats: dict[str, Any]) -> None:
    write_json(_path(run_dir, index), stats)


def read_all(run_dir: str, n: int) -> list[dict[str, Any]]:
    out = []
    for index in range(n):
        try:
            with open(_path(run_dir, index), encoding="utf-8") as fh:
                found = json.load(fh)
        except (OSError, ValueError):
            continue  # being replaced
        if isinstance(found, dict) and isinstance(found.get("pid"), int) and alive(found["pid"]):
            out.append(found)
    return out


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        mine = into.get(key)
        if key in _OWN:
            continue
        if key not in into:
            into[key] = value
        elif key == "last" and isinstance(value, dict) and isinstance(mine, dict):
            if (value.get("at") or 0) > (mine.get("at") or 0):
                into[key] = value
        elif isinstance(mine, dict) and isinstance(value, dict):
            _merge(mine, value)
        elif _number(mine) and _number(value):
            into[key] = max(mine, value) if key == "keys" else mine + value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merged(own: dict[str, Any], others: list[dict[str, Any]], per_worker: bool) -> dict[str, Any]:
    """`own` (the answering worker's, fresh) merged with the `others`' files."""
    workers = [own, *(o for o in others if o.get("pid") != own.get("pid"))]
    out = json.loads(json.dumps(own, default=str))  # a deep copy to merge into
    for found in workers[1:]:
        _merge(out, found)
    out["pid"] = own.get("pid")  # the worker that answered
    out["workers"] = len(workers)
    out["pids"] = sorted(w["pid"] for w in workers)
    if per_worker:
        out["per_worker"] = sorted(workers, key=lambda w: w["pid"])
    return out
