"""Micro-benchmark of one throttle check (sans-IO core, one worker).

Usage: .venv/bin/python benches/throttle_bench.py [--seconds 0.5]

Scenarios, each called with a fresh `time.monotonic()`-like float per check and limits high
enough that every check is allowed (the common path):

- bucket:    `TokenBucket.take(now)`
- map-hit:   `BucketMap.take(now, key)` over 1,000 warm client keys (LRU move_to_end)
- chain-3:   `ThrottleChain.check(now, plan=BucketMap, plan_key=..., route_key=...)` with a
             per-client plan, a per-client route and the server bucket
- chain-3+h: chain-3 plus rendering `ratelimit_headers(result)`
- refused:   chain-3 where the route level refuses (the 429 path, check only)

Prints µs/check and checks/s, best of 5 rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from edgeplane.throttle import BucketMap, ThrottleChain, TokenBucket, ratelimit_headers  # noqa: E402

BIG = 10**12


def _measure(fn, seconds: float) -> float:
    """Best-of-5 cost of one call of fn(i), in seconds."""
    # Calibrate a batch size of about seconds/5.
    n = 1000
    while True:
        t = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t
        if dt > seconds / 20 or n > 10**8:
            break
        n *= 4
    batch = max(1000, int(n * (seconds / 5) / max(dt, 1e-9)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        fn(batch)
        best = min(best, (time.perf_counter() - t) / batch)
    return best


def _loop_overhead(count: int) -> None:
    now = 0.0
    for i in range(count):
        now = i * 1e-6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()

    bucket = TokenBucket(rate=BIG, burst=BIG)

    def run_bucket(count: int) -> None:
        take = bucket.take
        for i in range(count):
            take(i * 1e-6)

    cmap = BucketMap(rate=BIG, burst=BIG)
    keys = [f"client-{k}" for k in range(1000)]
    for k in keys:
        cmap.take(0.0, k)

    def run_map(count: int) -> None:
        take = cmap.take
        ks = keys
        for i in range(count):
            take(i * 1e-6, ks[i % 1000])

    plan = BucketMap(rate=BIG, burst=BIG, policy="gold")
    chain = ThrottleChain(route=BucketMap(rate=BIG, burst=BIG, policy="route"), server=TokenBucket(BIG, BIG, "server"))
    for k in keys:
        chain.check(0.0, plan=plan, plan_key=k, route_key=k)

    def run_chain(count: int) -> None:
        check = chain.check
        ks = keys
        for i in range(count):
            k = ks[i % 1000]
            check(i * 1e-6, plan, k, k)

    def run_chain_headers(count: int) -> None:
        check = chain.check
        ks = keys
        for i in range(count):
            k = ks[i % 1000]
            ratelimit_headers(check(i * 1e-6, plan, k, k))

    refusing = ThrottleChain(route=TokenBucket(rate=1e-9, burst=1), server=TokenBucket(BIG, BIG))
    refusing.check(0.0)

    def run_refused(count: int) -> None:
        check = refusing.check
        ks = keys
        for i in range(count):
            check(i * 1e-6, plan, ks[i % 1000])

    overhead = _measure(_loop_overhead, args.seconds / 2)
    print(f"python {sys.version.split()[0]}; loop overhead {overhead * 1e6:.3f} µs subtracted")
    print(f"{'scenario':<10} {'µs/check':>9} {'checks/s':>12}")
    for name, fn in (
        ("bucket", run_bucket),
        ("map-hit", run_map),
        ("chain-3", run_chain),
        ("chain-3+h", run_chain_headers),
        ("refused", run_refused),
    ):
        per = max(_measure(fn, args.seconds) - overhead, 1e-12)
        print(f"{name:<10} {per * 1e6:>9.3f} {1 / per:>12,.0f}")


if __name__ == "__main__":
    main()
