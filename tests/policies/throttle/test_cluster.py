"""Cluster mode (`edgeplane.cluster`) against a real redis-server: the Redis script's
arithmetic, leases and credit, two "hosts" sharing one limit, quotas in Redis, Redis
killed mid-run (fail open and fail closed, never hanging), and two real gateway
processes sharing one limit, counted at the upstream."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest
from redis.asyncio import Redis

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.config.model import ClusterConfig
from edgeplane.policies.api_keys.store import generate_key
from edgeplane.policies.throttle.buckets import LevelChain
from edgeplane.policies.throttle.cluster import TAKE_SCRIPT, RedisLimiter

pytestmark = pytest.mark.timeout(60)
KEY, KEY_HASH = generate_key()


def _cluster(url: str, **kw) -> dict:
    return {"redis": url, "timeout": "200ms", "retry_interval": "200ms", **kw}


async def _script(client: Redis, key: str, rate: float, burst: int, want: int, debt: int):
    granted, level = await client.eval(TAKE_SCRIPT, 1, key, repr(float(rate)), burst, want, debt)
    return int(granted), float(level)


# ---------------------------------------------------------------------- the script
async def test_script_is_a_token_bucket_on_redis_time(redis_server):
    client = Redis.from_url(redis_server.url)
    try:
        assert await _script(client, "k", 100, 10, 4, 0) == (4, pytest.approx(6, abs=0.2))  # absent = full
        g, level = await _script(client, "k", 100, 10, 20, 0)
        assert g == 6 and level == pytest.approx(0, abs=0.3)      # grants what is there, whole tokens
        g, level = await _script(client, "k", 100, 10, 5, 3)       # debt is debited unconditionally
        assert g == 0 and level == pytest.approx(-3, abs=0.5)
        await asyncio.sleep(0.1)                                   # 100/s x 0.1 s = 10 tokens
        g, level = await _script(client, "k", 100, 10, 0, 0)
        assert g == 0 and level == pytest.approx(7, abs=1.0)
        await asyncio.sleep(0.2)                                   # capped at the burst
        assert (await _script(client, "k", 100, 10, 0, 0))[1] == pytest.approx(10)
        ttl = await client.pttl("k")
        assert 0 < ttl <= 1000 + 10                                 # full: expires after the grace second
        await _script(client, "k2", 1, 10, 10, 0)
        assert 9000 < await client.pttl("k2") <= 11000               # empty at 1/s: full again in 10 s
    finally:
        await client.aclose()


# ---------------------------------------------------------------------- leases
async def test_first_request_goes_on_credit_then_lease_arrives(redis_server):
    limiter = RedisLimiter(ClusterConfig(redis=redis_server.url, lease=0.1))
    try:
        lim = limiter.limit("route:GET /x", rate=10, burst=50, policy="route", keyed=True)
        assert lim.lease == 5    # 0.1 x 50
        b = lim.bucket("alice")
        now = time.monotonic()
        assert b.wait(now) == 0.0                  # nothing held, no answer yet: credit
        b.spend(now)
        assert (b.tokens, b.debt, b.inflight) == (0.0, 1, True)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not b.inflight:
                break
        assert (b.tokens, b.debt) == (5.0, 0)      # the debt settled, a lease of 5 held
        assert b.remote == pytest.approx(44, abs=0.5)
        raw = Redis.from_url(redis_server.url)
        stored = await raw.hgetall(b"edgeplane:t:route:GET /x:=alice")
        await raw.aclose()
        assert float(stored[b"tokens"]) == pytest.approx(44, abs=0.5)
        assert lim.bucket("bob") is not b and lim.bucket("alice") is b
    finally:
        await limiter.close()


async def test_two_hosts_share_one_limit_within_the_lease_bound(redis_server):
    """Two limiters (two hosts' workers) hammer one bucket for ~2 s: the admitted count is
    burst + rate x T within the stated bound (2 x workers x lease over, workers x lease under)."""
    rate, burst = 500.0, 100
    hosts = [RedisLimiter(ClusterConfig(redis=redis_server.url, lease=0.1)) for _ in range(2)]
    try:
        chains = [LevelChain(route=h.limit("route:GET /shared", rate, burst, "route", keyed=False).bucket())
                  for h in hosts]
        admitted = [0, 0]
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < 2.0:
            for i, chain in enumerate(chains):
                if chain.check(now).allowed:
                    admitted[i] += 1
            await asyncio.sleep(0)   # let the refills run, as an event loop serving requests does
        elapsed = time.monotonic() - t0
        expected = burst + rate * elapsed
        lease = 10
        total = sum(admitted)
        assert expected - 2 * lease - 5 <= total <= expected + 4 * lease, (total, expected, admitted)
        assert min(admitted) > 0.25 * total   # both hosts got a share
        assert all(h.stats["redis_errors"] == 0 for h in hosts)
        # far fewer Redis round trips than admitted requests
        assert sum(h.stats["redis_calls"] for h in hosts) < total / 2
    finally:
        for h in hosts:
            await h.close()


# ---------------------------------------------------------------------- config
def test_config_accepts_cluster_and_lifts_the_worker_restriction(redis_server):
    cfg = load_config(base_config(9, routes=[{
        "route": "GET /s", "integration": {"type": "mock"},
        "throttle": {"rate": 5, "burst": 5, "key": "$context.identity.sourceIp"}}],
        workers=2, cluster={"redis": redis_server.url, "failure_mode": "closed", "timeout": "50ms"}))
    assert cfg.cluster == ClusterConfig(redis=redis_server.url, failure_mode="closed", timeout=0.05)


@pytest.mark.parametrize("cluster, where, words", [
    ({"redis": "http://x"}, "cluster.redis", "redis://, rediss://, unix://"),
    ({"redis": "redis://h:port"}, "cluster.redis", "not a Redis URL"),
    ({"redis": "redis://h", "failure_mode": "maybe"}, "cluster.failure_mode", "open"),
    ({"redis": "redis://h", "lease": 0}, "cluster.lease", "0"),
    ({"redis": "redis://h", "lease": 2}, "cluster.lease", "1"),
    ({"redis": "redis://h", "timeout": "0s"}, "cluster.timeout", "> 0"),
    ({"failure_mode": "open"}, "cluster", "redis"),
    ({"redis": "redis://h", "leases": 1}, "cluster", "leases"),
])
def test_config_refuses_bad_cluster_sections_by_location(cluster, where, words):
    with pytest.raises(ConfigError) as e:
        load_config(base_config(9, cluster=cluster))
    text = str(e.value)
    assert where in text and words in text, text


# ---------------------------------------------------------------------- through a gateway
def _throttled(upstream_port: int, cluster: dict, throttle: dict, **extra) -> dict:
    return base_config(upstream_port, routes=[
        {"route": "GET /search", "integration": {"type": "http", "upstream": "demo"}, "throttle": throttle},
    ], cluster=cluster, **extra)


async def _statuses(addr, n: int, headers: dict | None = None) -> list[int]:
    c = await RawClient.connect(addr)
    try:
        return [(await asyncio.wait_for(c.request("GET", "/search", headers=headers), 5)).status
                for _ in range(n)]
    finally:
        await c.close()


async def _settle(gw) -> None:
    """Wait until no refill is in flight (the answers have been applied)."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if gw._limiter._flight is None and not gw._limiter._pending:
            return


async def test_per_client_limit_in_redis_isolates_clients(upstream, gateway, redis_server):
    gw = await gateway(_throttled(upstream.port, _cluster(redis_server.url),
                                  {"rate": 0.001, "burst": 10, "key": "$request.header.X-Client"}))
    addr = gw.addresses[0]
    first = await _statuses(addr, 15, {"X-Client": "a"})
    await _settle(gw)
    later = await _statuses(addr, 5, {"X-Client": "a"})
    assert first.count(200) >= 10 and later == [429] * 5
    assert (first + later).count(200) <= 10 + 2 * 4   # the bound: burst + 2 x workers x lease (4)
    assert (await _statuses(addr, 3, {"X-Client": "b"})) == [200] * 3   # b has its own bucket
    c = await RawClient.connect(addr)
    r = await c.request("GET", "/search", headers={"X-Client": "a"})
    await c.close()
    assert r.status == 429 and orjson.loads(r.body) == {"message": "Too Many Requests"}
    assert int(r.header("retry-after")) >= 1 and "q=10" in r.header("ratelimit-policy")
    raw = Redis.from_url(redis_server.url)
    keys = sorted(await raw.keys("edgeplane:t:*"))
    await raw.aclose()
    assert keys == [b"edgeplane:t:route:GET /search:=a", b"edgeplane:t:route:GET /search:=b"]


async def test_redis_killed_fails_open_without_hanging_then_recovers(upstream, gateway, redis_server, caplog):
    gw = await gateway(_throttled(upstream.port, _cluster(redis_server.url), {"rate": 100, "burst": 50}))
    addr = gw.addresses[0]
    assert await _statuses(addr, 3) == [200] * 3
    await _settle(gw)
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="edgeplane.cluster"):
        t0 = time.monotonic()
        statuses = await _statuses(addr, 200)   # the next refill meets the dead Redis; open: admitted
        assert time.monotonic() - t0 < 10
    assert statuses == [200] * 200
    stats = gw.stats()["cluster"]
    assert stats["up"] is False and stats["redis_errors"] >= 1 and stats["failed_open"] >= 100
    assert any("unreachable" in r.getMessage() and "fail open" in r.getMessage() for r in caplog.records)
    redis_server.start()                     # same port; empty, so the bucket is full again
    for _ in range(100):
        await _statuses(addr, 1)
        if gw._limiter.up:
            break
        await asyncio.sleep(0.05)
    assert gw._limiter.up
    await _settle(gw)
    after = await _statuses(addr, 300)       # ~50 + 100/s x the run + the lease bound, then 429s
    assert 429 in after and after.count(200) >= 50   # limits enforced again


async def test_redis_killed_fails_closed_with_503(upstream, gateway, redis_server):
    gw = await gateway(_throttled(upstream.port, _cluster(redis_server.url, failure_mode="closed"),
                                  {"rate": 100, "burst": 50}))
    addr = gw.addresses[0]
    assert await _statuses(addr, 3) == [200] * 3
    redis_server.kill()
    statuses = []
    for _ in range(20):
        statuses += await _statuses(addr, 5)
        if statuses[-1] == 503:
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 503
    c = await RawClient.connect(addr)
    r = await c.request("GET", "/search")
    await c.close()
    assert r.status == 503 and orjson.loads(r.body) == {"message": "Service Unavailable"}
    assert r.header("retry-after") == "1"
    assert gw.stats()["cluster"]["failed_closed"] >= 1


async def test_quota_in_redis_is_shared_and_survives_a_new_gateway(upstream, gateway, redis_server, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{id: k1, hash: '{KEY_HASH}', plan: small}}\n")
    cfg = base_config(upstream.port, routes=[
        {"route": "GET /search", "integration": {"type": "http", "upstream": "demo"}, "auth": "keys"}],
        authorizers={"keys": {"type": "api_key", "keys_file": str(keys)}},
        usage_plans={"small": {"quota": {"limit": 6, "period": "DAY"}}},
        cluster=_cluster(redis_server.url), data_dir=str(tmp_path / "unused"))
    hdr = {"x-api-key": KEY}
    gw1 = await gateway(cfg)
    assert await _statuses(gw1.addresses[0], 4, hdr) == [200] * 4
    await gw1._quota_store.aflush()
    gw2 = await gateway(cfg)                  # another host: loads the count from Redis
    assert await _statuses(gw2.addresses[0], 3, hdr) == [200, 200, 429]
    c = await RawClient.connect(gw2.addresses[0])
    r = await c.request("GET", "/search", headers=hdr)
    await c.close()
    assert orjson.loads(r.body) == {"message": "Limit Exceeded"}
    await gw2._quota_store.aflush()
    await gw1._quota_store.aflush()            # gw1 learns the total
    assert await _statuses(gw1.addresses[0], 1, hdr) == [429]
    raw = Redis.from_url(redis_server.url)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert int(await raw.get(f"edgeplane:q:{day}:k1")) == 6
    assert 30 * 86400 < await raw.ttl(f"edgeplane:q:{day}:k1") <= 36 * 86400
    await raw.aclose()
    assert not (tmp_path / "unused").exists()    # no SQLite in cluster mode


async def test_usage_command_reads_redis(upstream, redis_server, tmp_path):
    import subprocess
    import sys

    import yaml

    raw = Redis.from_url(redis_server.url)
    await raw.set("edgeplane:q:2026-11-25:k1", 42)
    await raw.set("edgeplane:q:2026-11-25:k2", 7)
    await raw.aclose()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{id: k1, hash: '{KEY_HASH}', plan: small}}\n")
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(base_config(upstream.port, cluster={"redis": redis_server.url},
                                               authorizers={"keys": {"type": "api_key", "keys_file": str(keys)}},
                                               usage_plans={"small": {"quota": {"limit": 100, "period": "DAY"}}})))
    out = subprocess.run([sys.executable, "-m", "edgeplane", "usage", "-c", str(path), "--key", "k1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "k1" in out.stdout and "42" in out.stdout and "k2" not in out.stdout
    assert "2026-11-25" in out.stdout


# ---------------------------------------------------------------------- real processes
async def test_two_gateway_processes_share_one_limit_and_survive_redis_loss(upstream, redis_server, tmp_path):
    """Two `edgeplane serve` processes (two hosts) in front of one upstream share a route
    limit through Redis: counted at the upstream, admitted = burst + rate x T within the
    lease bound. Then Redis is killed mid-run: both keep answering (fail open), none hangs."""
    from test_processes import _get_json, _start_serve, _stop

    rate, burst = 100.0, 50
    cfg = _throttled(upstream.port, _cluster(redis_server.url), {"rate": rate, "burst": burst})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [await _start_serve(tmp_path / "a", cfg), await _start_serve(tmp_path / "b", cfg)]
    try:
        async def hammer(addr, seconds: float, out: list) -> None:
            c = await RawClient.connect(addr)
            try:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    out.append((await asyncio.wait_for(c.request("GET", "/search"), 5)).status)
            finally:
                await c.close()

        before = upstream.requests
        results: list[list[int]] = [[] for _ in range(4)]
        t0 = time.monotonic()
        await asyncio.gather(*(hammer(procs[i % 2][1], 2.0, results[i]) for i in range(4)))
        elapsed = time.monotonic() - t0
        ok = sum(r.count(200) for r in results)
        assert all(s in (200, 429) for r in results for s in r)
        counted = upstream.requests - before
        assert counted == ok
        expected = burst + rate * elapsed
        lease = 5  # 0.1 x burst
        assert expected - 2 * lease - 10 <= ok <= expected + 2 * 2 * lease + 5, (ok, expected)
        assert all(r.count(200) > 0 for r in results)   # both gateways admitted some

        redis_server.kill()
        results = [[] for _ in range(4)]
        await asyncio.gather(*(hammer(procs[i % 2][1], 1.0, results[i]) for i in range(4)))
        assert all(r[-1] == 200 for r in results)       # fail open, no hang (5 s timeout per request)
        for _, _, admin, _, _ in procs:
            _, stats = await _get_json(admin, "/stats")
            assert stats["cluster"]["up"] is False and stats["cluster"]["redis_errors"] >= 1
    finally:
        for proc, _, _, lines, drain in procs:
            assert await _stop(proc, drain) == 0, "".join(lines)
    assert any("unreachable" in line for line in procs[0][3] + procs[1][3])



async def test_redis_frozen_counts_as_down_and_nothing_hangs(upstream, gateway, redis_server):
    """A Redis that accepts connections but never answers (SIGSTOP): each refill times
    out after `cluster.timeout`, Redis is marked down, requests fail open; no request
    waits on it. After SIGCONT the probe brings it back."""
    import os
    import signal

    gw = await gateway(_throttled(upstream.port, _cluster(redis_server.url), {"rate": 100, "burst": 50}))
    addr = gw.addresses[0]
    assert await _statuses(addr, 3) == [200] * 3
    await _settle(gw)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        statuses = await _statuses(addr, 100)
        await asyncio.sleep(0.3)              # past the 200 ms timeout of the refill in flight
        statuses += await _statuses(addr, 100)
        assert time.monotonic() - t0 < 10
        assert statuses[-100:] == [200] * 100  # open
        assert gw._limiter.up is False and gw.stats()["cluster"]["redis_errors"] >= 1
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    for _ in range(100):
        await _statuses(addr, 1)
        if gw._limiter.up:
            break
        await asyncio.sleep(0.05)
    assert gw._limiter.up


async def test_a_quota_flush_sent_twice_is_counted_once(redis_server):
    """A flush whose answer timed out may have been applied: it is sent again as the same
    batch with the same id, and the script applies an id once."""
    from edgeplane.policies.quota.store import QuotaPeriod
    from edgeplane.policies.throttle.cluster import RedisQuotaStore

    limiter = RedisLimiter(ClusterConfig(redis=redis_server.url))
    store = RedisQuotaStore(limiter, [QuotaPeriod("DAY")])
    day = time.strftime("%Y-%m-%d", time.gmtime())
    try:
        for _ in range(2):  # the same batch twice, as after a timeout
            store._unsent = ("fixed-flush-id", {("k1", day): 3})
            assert await store.aflush() == 3
        store._unsent = ("another-id", {("k1", day): 2})
        await store.aflush()
        raw = Redis.from_url(redis_server.url)
        assert int(await raw.get(f"edgeplane:q:{day}:k1")) == 5
        assert 0 < await raw.ttl("edgeplane:qf:fixed-flush-id") <= 3600
        await raw.aclose()
        assert store.counter.used("k1", time.time()) == 5 and store.pending() == 0
    finally:
        await limiter.close()
