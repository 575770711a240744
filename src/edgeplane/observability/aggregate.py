"""One view of every worker: per-worker metric files, merged on a scrape.

Owns the files a worker of `workers: N` writes into its supervisor's private directory
(`metrics-<index>.json`, replaced whole once a second and before it answers a scrape)
and how any worker merges them into the answer:

- counters and histograms are summed over the workers;
- gauges are summed over the workers that are alive (a file's pid), so a dead
  worker's open connections do not linger;
- info series (value 1) are the union.

A worker that restarts reads its slot's file first (`load_base`) and adds those
counters to its own, so a restart never makes a counter go down. The files live as
long as the supervisor; a takeover (a new supervisor) starts from zero, which
Prometheus reads as a counter reset.

Invariants: a file is written to a temporary name and renamed, so a reader sees a
whole file; a file that cannot be read is skipped (its worker is being replaced).
"""

from __future__ import annotations

import json
import os
from typing import Any

from edgeplane.observability.families import FAMILIES
from edgeplane.runtime.systemd import alive

Samples = dict[str, dict[tuple[str, ...], Any]]  # family -> label values -> value


def _path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, f"metrics-{index}.json")


def encode(samples: Samples) -> dict[str, list[list[Any]]]:
    return {name: [[*labels, value] for labels, value in found.items()] for name, found in samples.items()}


def decode(raw: dict[str, list[list[Any]]]) -> Samples:
    out: Samples = {}
    for name, rows in raw.items():
        family = FAMILIES.get(name)
        if family is None:
            continue
        n = len(family.labels)
        out[name] = {tuple(row[:n]): row[n] for row in rows if len(row) == n + 1}
    return out


def write_json(path: str, obj: Any) -> None:
    """Replace `path` whole with `obj` as JSON (a reader sees the old file or the new)."""
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(obj, fh, default=str, separators=(",", ":"))
    os.replace(path + ".tmp", path)


def write(run_dir: str, index: int, samples: Samples) -> None:
    write_json(_path(run_dir, index), {"pid": os.getpid(), "samples": encode(samples)})


def _read(path: str) -> tuple[int, Samples] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        return int(raw["pid"]), decode(raw["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_base(run_dir: str, index: int) -> Samples:
    """The counters the previous worker of this slot left (none: an empty base)."""
    found = _read(_path(run_dir, index))
    if found is None:
        return {}
    return {name: values for name, values in found[1].items() if FAMILIES[name].type in ("counter", "histogram")}


def read_all(run_dir: str, n: int) -> list[tuple[int, Samples]]:
    out = []
    for index in range(n):
        found = _read(_path(run_dir, index))
        if found is not None:
            out.append(found)
    return out


def add(into: Samples, other: Samples, *, gauges: bool = True) -> None:
    """Add `other` into `into` (see the module docstring for each type)."""
    for name, values in other.items():
        kind = FAMILIES[name].type
        if kind == "gauge" and not gauges:
            continue
        target = into.setdefault(name, {})
        for labels, value in values.items():
            old = target.get(labels)
            if kind == "info":
                target[labels] = 1
            elif kind == "histogram":
                target[labels] = value if old is None else [a + b for a, b in zip(old, value, strict=True)]
            else:
                target[labels] = value if old is None else old + value


def merge(workers: list[tuple[int, Samples]]) -> Samples:
    out: Samples = {}
    for pid, samples in workers:
        add(out, samples, gauges=alive(pid))
    return out
