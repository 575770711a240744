"""Micro-benchmark of one throttle check (sans-IO core, one worker; the shared-memory and
Redis-leased levels the multi-worker and cluster modes use).

Usage: .venv/bin/python benches/throttle_bench.py [--seconds 0.5] [--lease 0.1]

Scenarios, each called with a fresh `time.monotonic()`-like float per check and limits high
enough that every check is allowed (the common path):

- bucket:    `TokenBucket.take(now)`
- map-hit:   `BucketMap.take(now, key)` over 1,000 warm client keys (LRU move_to_end)
- chain-3:   `ThrottleChain.check(now, plan=BucketMap, plan_key=..., route_key=...)` with a
             per-client plan, a per-client route and the server bucket
- chain-3+h: chain-3 plus rendering `ratelimit_headers(result)`
- refused:   chain-3 where the route level refuses (the 429 path, check only)
- shared:    `LevelChain.check(now)` over a route and a server-wide `SharedBucket` of a
             `SharedLimitTable` created for 4 workers and attached as worker 0 (as
             `limits.SharedLimits` wires them for `workers: 4`), allowed path
- leased:    `LevelChain.check(now)` over a route and a server-wide Redis-leased bucket
             (`cluster.RedisLimiter` against a redis-server this script starts on a free
             port and kills at the end), when the lease holds tokens: the hot path. Run
             inside a uvloop event loop, in slices of at most 1,000 checks with a yield to
             the loop after each slice, so the refills queued by `take` reach Redis (the
             time spent in the loop between slices is not counted).
- leased-cpu: the amortised cost of an admitted request, Redis refills included: checks
             with `time.monotonic()` for about max(1 s, 2 x --seconds) on one uvloop loop
             (a yield every 100 checks, and after any refusal), `time.process_time()` of this
             process divided by the admitted checks. The notes under the table give the
             lease, the Redis round trips per 1,000 admitted (`limiter.stats`), and the
             redis-server's own CPU per admitted request.

The leased scenarios use rate 1,000,000/s and burst 100,000, so every check is admitted,
and a lease of `--lease` x burst tokens per level (`cluster.lease`, default 0.1: 10,000
tokens). Without redis-server on PATH they are reported as skipped.

Prints µs/check and checks/s, best of 5 rounds (leased-cpu: one run, CPU per admitted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import uvloop  # noqa: E402

from edgeplane.policies.throttle.buckets import (  # noqa: E402
    BucketMap,
    LevelChain,
    Policy,
    ThrottleChain,
    TokenBucket,
    ratelimit_headers,
)
from edgeplane.policies.throttle.shared_limits import SharedLimitTable  # noqa: E402
from limit_accuracy import REDIS_MISSING, RedisServer, redis_binary  # noqa: E402

BIG = 10**12
LEASED_RATE = 1e6   # leased scenarios: high enough that every check is admitted
LEASED_BURST = 100_000
SLICE = 1000        # leased: checks between two yields to the event loop (hot path)
CPU_SLICE = 100     # leased-cpu: checks between two yields
READY_TIMEOUT = 5.0  # leased: longest wait for Redis to answer a refill


def _measure_timed(timed, seconds: float) -> float:
    """Best-of-5 cost of one check, in seconds; `timed(n)` runs n checks and returns the
    seconds they took."""
    # Calibrate a batch size of about seconds/5.
    n = 1000
    while True:
        dt = timed(n)
        if dt > seconds / 20 or n > 10**8:
            break
        n *= 4
    batch = max(1000, int(n * (seconds / 5) / max(dt, 1e-9)))
    return min(timed(batch) / batch for _ in range(5))


def _measure(fn, seconds: float) -> float:
    """Best-of-5 cost of one call of fn(i), in seconds."""
    def timed(count: int) -> float:
        t = time.perf_counter()
        fn(count)
        return time.perf_counter() - t
    return _measure_timed(timed, seconds)


def _loop_overhead(count: int) -> float:
    now = 0.0
    for i in range(count):
        now = i * 1e-6
    return now


# ---------------------------------------------------------------------- shared memory
def _shared_chain() -> tuple[SharedLimitTable, SharedLimitTable, LevelChain]:
    """Limit 0 = server-wide, 1 = the route, as `limits.SharedLimits` numbers them."""
    name = f"edgeplane-bench-{os.getpid()}"
    owner = SharedLimitTable.create(name, n_workers=4, n_limits=2, epoch=0.0)
    try:
        table = SharedLimitTable.attach(name, 0)
    except BaseException:
        owner.close()
        owner.unlink()
        raise
    levels = []
    for index, policy in ((1, "route"), (0, "server")):
        b = table.bucket(index, BIG, BIG)
        b._policy = Policy(policy, BIG, BIG)
        levels.append(b)
    return owner, table, LevelChain(route=levels[0], server=levels[1])


# ---------------------------------------------------------------------- Redis leases
class _Leased:
    """A `RedisLimiter` with a route and a server-wide leased level on a private loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, lease: float, tag: str) -> None:
        from edgeplane.config.model import ClusterConfig
        from edgeplane.policies.throttle.cluster import RedisLimiter

        # 1 s per round trip: a busy 2-CPU machine must not count as "Redis down".
        self.limiter = RedisLimiter(ClusterConfig(redis=url, lease=lease, timeout=1.0,
                                                  key_prefix=f"bench{os.getpid()}:"), loop)
        lim = self.limiter.limit(f"route:GET /{tag}", LEASED_RATE, LEASED_BURST, "route", keyed=False)
        self.lease = lim.lease
        self.route = lim.bucket()
        self.server = self.limiter.limit(f"server:{tag}", LEASED_RATE, LEASED_BURST, "server",
                                         keyed=False).bucket()
        self.chain = LevelChain(route=self.route, server=self.server)

    async def held(self, n: int) -> None:
        """Yield to the loop once, then until both levels hold `n` tokens."""
        await asyncio.sleep(0)
        deadline = time.monotonic() + READY_TIMEOUT
        while self.route.tokens < n or self.server.tokens < n:
            if not self.limiter.up or time.monotonic() > deadline:
                raise RuntimeError(f"no lease from Redis within {READY_TIMEOUT:.0f}s: {self.limiter.stats}")
            await asyncio.sleep(0)

    async def prime(self) -> None:
        """First check goes on credit; wait for the first lease of both levels."""
        self.chain.check(time.monotonic())
        await self.held(1)


def _leased_rows(loop: asyncio.AbstractEventLoop, url: str, lease_fraction: float, seconds: float,
                 overhead: float, redis_pid: int) -> tuple[list[tuple[str, float]], list[str]]:
    from procs import cpu_seconds

    # (a) hot path: the lease holds tokens
    hot = _Leased(loop, url, lease_fraction, "hot")
    loop.run_until_complete(hot.prime())
    per_slice = max(1, min(SLICE, hot.lease // 2))  # a slice never outruns what is held

    async def timed_async(count: int) -> float:
        check = hot.chain.check
        spent = 0.0
        done = 0
        while done < count:
            n = min(per_slice, count - done)
            await hot.held(n)
            t = time.perf_counter()
            for i in range(done, done + n):
                check(i * 1e-6)
            spent += time.perf_counter() - t
            done += n
        return spent

    per_hot = max(_measure_timed(lambda n: loop.run_until_complete(timed_async(n)), seconds) - overhead, 1e-12)
    loop.run_until_complete(hot.limiter.close())

    # (b) amortised CPU per admitted request, refills included
    amort = _Leased(loop, url, lease_fraction, "cpu")
    run_for = max(1.0, 2 * seconds)

    async def admit() -> tuple[int, int, float, float, float, int]:
        await amort.prime()
        check = amort.chain.check
        mono = time.monotonic
        stats = amort.limiter.stats
        calls0 = stats["redis_calls"]
        admitted = refused = 0
        redis0 = cpu_seconds(redis_pid)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + run_for
        while time.perf_counter() < end:
            for _ in range(CPU_SLICE):
                if check(mono()).allowed:
                    admitted += 1
                else:
                    refused += 1
                    break
            await asyncio.sleep(0)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        redis_cpu = cpu_seconds(redis_pid) - redis0
        return admitted, refused, cpu, wall, redis_cpu, stats["redis_calls"] - calls0

    try:
        admitted, refused, cpu, wall, redis_cpu, calls = loop.run_until_complete(admit())
        stats = dict(amort.limiter.stats)
    finally:
        loop.run_until_complete(amort.limiter.close())
    per_cpu = cpu / max(admitted, 1)
    notes = [
        f"leased: rate {LEASED_RATE:,.0f}/s, burst {LEASED_BURST:,}, lease {hot.lease:,} tokens per level "
        f"(cluster.lease {lease_fraction:g} x burst), route + server level in one LevelChain; "
        f"uvloop, Redis on 127.0.0.1",
        f"leased-cpu: {wall:.2f} s on one loop: {admitted:,} admitted, {refused:,} refused, "
        f"{calls:,} Redis round trips ({calls * 1000 / max(admitted, 1):.3f} per 1,000 admitted), "
        f"process CPU {cpu:.3f} s ({cpu / wall:.0%} of the wall time), "
        f"redis-server CPU {redis_cpu * 1e6 / max(admitted, 1):.3f} µs/admitted "
        f"(/proc, 10 ms ticks), redis_errors {stats['redis_errors']}, "
        f"leased_tokens {stats['leased_tokens']:,}",
    ]
    return [("leased", per_hot), ("leased-cpu", per_cpu)], notes


def main() -> None:
    ap = argparse.ArgumentParser(description="Cost of one throttle check, per kind of level.")
    ap.add_argument("--seconds", type=float, default=0.5, help="measuring time per scenario (default 0.5)")
    ap.add_argument("--lease", type=float, default=0.1,
                    help="leased scenarios: cluster.lease, the share of the burst leased at a time (default 0.1)")
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

    def row(name: str, per: float) -> None:
        print(f"{name:<10} {per * 1e6:>9.3f} {1 / per:>12,.0f}", flush=True)

    overhead = _measure(_loop_overhead, args.seconds / 2)
    print(f"python {sys.version.split()[0]}; loop overhead {overhead * 1e6:.3f} µs subtracted "
          f"(not from leased-cpu)")
    print(f"{'scenario':<10} {'µs/check':>9} {'checks/s':>12}")
    for name, fn in (
        ("bucket", run_bucket),
        ("map-hit", run_map),
        ("chain-3", run_chain),
        ("chain-3+h", run_chain_headers),
        ("refused", run_refused),
    ):
        row(name, max(_measure(fn, args.seconds) - overhead, 1e-12))

    owner, table, shared = _shared_chain()
    try:
        def run_shared(count: int) -> None:
            check = shared.check
            for i in range(count):
                check(i * 1e-6)

        row("shared", max(_measure(run_shared, args.seconds) - overhead, 1e-12))
    finally:
        table.close()
        owner.close()
        owner.unlink()

    notes = []
    if redis_binary() is None:
        print(f"{'leased':<10} skipped: {REDIS_MISSING}")
    else:
        loop = uvloop.new_event_loop()
        with tempfile.TemporaryDirectory(prefix="throttle-bench-") as workdir:
            redis = RedisServer(workdir)
            try:
                redis.start()
                rows, notes = _leased_rows(loop, redis.url, args.lease, args.seconds, overhead, redis.pid)
                for name, per in rows:
                    row(name, per)
            finally:
                redis.stop()
                loop.close()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
