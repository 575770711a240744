#!/usr/bin/env python3
"""Compare two bench runs: `benches/compare.py A.json B.json [--noise 0.05]`.

Reads two JSON files written by `benches/run.py` and prints, for every (target,
scenario, kind) present in both, requests per CPU-second and p99 latency in A and B and
the change, marking the changes past the noise band (`--noise`, a fraction: 0.05 means
a change within ±5 % is noise, the spread two quiet runs of the same commit show on a
small VM). Each run's provenance (commit, Python, library versions, hot path) heads the
table, so a comparison says what it compares.

Exit 0; with `--fail-on-regression`, 2 when a req/CPU-s figure of the gateway dropped
past the band.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GATEWAY = "edgeplane"


def _index(data: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["target"], r["scenario"], r.get("kind", "closed")): r for r in data.get("results", [])}


def _prov(data: dict) -> str:
    p = (data.get("meta") or {}).get("provenance") or {}
    commit = (p.get("commit") or "unknown")[:12] + (" (dirty)" if p.get("dirty") else "")
    return (f"commit {commit}, Python {p.get('python', '?')}, uvloop {p.get('uvloop', '?')}, "
            f"httptools {p.get('httptools', '?')}, hot path {p.get('hot_path', '?')}")


def compare(a: dict, b: dict, noise: float) -> tuple[list[list[str]], list[str]]:
    rows, regressions = [], []
    ia, ib = _index(a), _index(b)
    for key in sorted(set(ia) & set(ib)):
        ra, rb = ia[key], ib[key]
        va, vb = ra.get("req_per_cpu_s"), rb.get("req_per_cpu_s")
        change = (vb / va - 1.0) if va and vb else None
        mark = ""
        if change is not None and abs(change) > noise:
            mark = "better" if change > 0 else "WORSE"
            if change < 0 and key[0] == GATEWAY:
                regressions.append(f"{key[1]} ({key[2]}): {change:+.1%}")
        p99a, p99b = (ra.get("latency_ms") or {}).get("p99"), (rb.get("latency_ms") or {}).get("p99")
        rows.append([key[0], key[1], key[2], f"{va:,.0f}" if va else "-", f"{vb:,.0f}" if vb else "-",
                     f"{change:+.1%}" if change is not None else "-", mark,
                     f"{p99a:.3g}" if p99a else "-", f"{p99b:.3g}" if p99b else "-"])
    return rows, regressions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="the earlier run's JSON")
    p.add_argument("b", type=Path, help="the later run's JSON")
    p.add_argument("--noise", type=float, default=0.05, help="noise band, a fraction (default 0.05)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 2 when the gateway's req/CPU-s dropped past the band")
    args = p.parse_args(argv)
    a, b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
    rows, regressions = compare(a, b, args.noise)
    print(f"A: {args.a} ({_prov(a)})\nB: {args.b} ({_prov(b)})\n")
    head = ["target", "scenario", "kind", "A req/CPU-s", "B req/CPU-s", "change", f"past ±{args.noise:.0%}",
            "A p99 ms", "B p99 ms"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for line in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip())
    if not rows:
        print("(no (target, scenario, kind) in both runs)")
    if regressions:
        print("\nregressions past the band: " + "; ".join(regressions))
    return 2 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
    sys.exit(main())
