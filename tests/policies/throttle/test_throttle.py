"""Unit tests for the sans-IO throttling core (edgeplane.throttle), with an injected clock."""

from __future__ import annotations

import math

import pytest

from edgeplane.policies.throttle.buckets import (
    BucketMap,
    LevelChain,
    ThrottleChain,
    TokenBucket,
    ratelimit_headers,
    retry_after_header,
)

T0 = 1000.0  # arbitrary monotonic reading


# --- TokenBucket arithmetic -------------------------------------------------------------


def test_burst_then_rate():
    b = TokenBucket(rate=10, burst=5)
    assert [b.take(T0) for _ in range(5)] == [0.0] * 5
    assert b.take(T0) == pytest.approx(0.1)  # empty: next token in 1/rate
    # Over 1 s at 10/s exactly 10 more are granted, one every 0.1 s.
    granted = 0
    for i in range(1, 101):
        if b.take(T0 + i * 0.01) == 0.0:
            granted += 1
    assert granted == 10


def test_float_steps_do_not_lose_due_tokens():
    # 0.7 - 0.6 == 0.09999999999999998 in floats: the due token must still be granted.
    b = TokenBucket(rate=10, burst=1)
    for i in range(0, 200):
        assert b.take(i / 10) == 0.0, i


def test_retry_after_values():
    b = TokenBucket(rate=2, burst=1)
    assert b.take(T0) == 0.0
    assert b.take(T0) == pytest.approx(0.5)
    assert b.take(T0 + 0.2) == pytest.approx(0.3)
    assert b.take(T0 + 0.5) == 0.0
    # n > 1: time until n tokens; a refused take takes nothing.
    b = TokenBucket(rate=4, burst=10)
    assert b.take(T0, 10) == 0.0
    assert b.take(T0 + 0.5, 3) == pytest.approx(0.25)
    assert b.remaining(T0 + 0.5) == 2
    # n > burst can never be satisfied.
    assert b.take(T0 + 100, 11) == math.inf
    assert b.remaining(T0 + 100) == 10


def test_remaining_and_reset_after():
    b = TokenBucket(rate=10, burst=20)
    assert b.remaining(T0) == 20
    assert b.reset_after(T0) == 0.0
    for _ in range(15):
        b.take(T0)
    assert b.remaining(T0) == 5
    assert b.reset_after(T0) == pytest.approx(1.5)
    assert b.remaining(T0 + 0.55) == 10
    assert b.reset_after(T0 + 0.55) == pytest.approx(0.95)
    assert b.remaining(T0 + 10) == 20  # capped at burst
    assert b.reset_after(T0 + 10) == 0.0


def test_clock_backwards_mints_nothing_and_locks_nobody_out():
    b = TokenBucket(rate=1, burst=2)
    assert b.take(T0) == 0.0 and b.take(T0) == 0.0
    assert b.take(T0) > 0
    # Clock jumps back 1000 s: no token minted by the step ...
    assert b.take(T0 - 1000) == pytest.approx(1.0)
    assert b.remaining(T0 - 1000) == 0
    # ... and refill resumes from the new reading: no lock-out for the size of the jump.
    assert b.take(T0 - 999) == 0.0
    # A clock that keeps stepping backwards never creates a token, however far it goes.
    assert all(b.take(T0 - 999 - i * 10) > 0.0 for i in range(1, 100))
    # Back and forth: only the forward steps count (50 steps of 1 s at 1/s), none of the
    # backward ones.
    base = T0 - 999 - 99 * 10  # the last reading
    granted = sum(b.take(base + (0.5 if i % 2 else -0.5)) == 0.0 for i in range(100))
    assert granted == 50


def test_standing_clock_mints_nothing():
    b = TokenBucket(rate=1e9, burst=3)
    assert [b.take(T0) for _ in range(4)][-1] > 0.0


def test_huge_rates_fine():
    b = TokenBucket(rate=1e300, burst=5)
    for _ in range(5):
        assert b.take(T0) == 0.0
    w = b.take(T0)
    assert 0.0 < w < 1e-200
    assert b.take(T0 + 1e-6) == 0.0
    assert b.remaining(T0 + 1e6) == 5
    assert TokenBucket(rate=10**40, burst=10**12).remaining(T0) == 10**12


@pytest.mark.parametrize(
    "rate,burst",
    [(0, 1), (1, 0), (-1, 1), (1, -5), (math.inf, 1), (math.nan, 1), ("10", 1), (1, 1.5), (True, 1), (1, True)],
)
def test_bad_limits_refused(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        BucketMap(rate, burst)


def test_bad_map_settings_and_policy_names_refused():
    for kw in ({"max_entries": 0}, {"idle_ttl": -1}, {"idle_ttl": math.inf}, {"policy": ""}, {"policy": "é"}):
        with pytest.raises(ValueError):
            BucketMap(1, 1, **kw)
    with pytest.raises(ValueError):
        TokenBucket(1, 1, policy="a\nb")


# --- BucketMap --------------------------------------------------------------------------


def test_bucketmap_isolation_between_clients():
    m = BucketMap(rate=1, burst=2)
    assert m.take(T0, "alice") == 0.0 and m.take(T0, "alice") == 0.0
    assert m.take(T0, "alice") > 0
    assert m.take(T0, "bob") == 0.0  # alice's exhaustion does not touch bob
    assert m.take(T0, b"alice") == 0.0  # bytes and str keys are distinct clients
    assert m.bucket("bob").remaining(T0) == 1
    assert len(m) == 3


def test_bucketmap_cap_bounds_memory_under_key_rotation():
    m = BucketMap(rate=1, burst=1, max_entries=100)
    for i in range(10_000):
        m.take(T0, f"attacker-{i}")
        assert len(m) <= 100
    assert len(m) == 100
    assert m.evictions == 9_900


def test_bucketmap_lru_keeps_recently_used():
    m = BucketMap(rate=1, burst=3, max_entries=3)
    m.take(T0, "a")
    m.take(T0, "b")
    m.take(T0, "c")
    m.take(T0, "a")  # a becomes most recent; b is now the LRU
    m.take(T0, "d")
    assert "b" not in m
    assert "a" in m and "c" in m and "d" in m
    assert m.bucket("a").remaining(T0) == 1  # a kept its state (2 taken)


def test_sweep_drops_idle_full_buckets_only():
    m = BucketMap(rate=1, burst=5, idle_ttl=10)
    m.take(T0, "old-full")  # full again after 1 s
    for _ in range(5):
        m.take(T0, "old-slow")  # needs 5 s to refill
    m.take(T0 + 8, "recent")
    assert m.sweep(T0 + 9) == 0  # nothing idle for 10 s yet
    assert m.sweep(T0 + 12) == 2  # both old ones are idle and full; "recent" idle 4 s
    assert "recent" in m and len(m) == 1
    assert m.sweep(T0 + 100) == 1
    assert len(m) == 0


def test_sweep_keeps_idle_but_not_yet_full():
    m = BucketMap(rate=0.01, burst=2, idle_ttl=1)  # 100 s per token
    m.take(T0, "k")
    m.take(T0, "k")
    assert m.sweep(T0 + 50) == 0  # idle but still in debt: dropping would forgive it
    assert m.bucket("k").remaining(T0 + 50) == 0
    assert m.sweep(T0 + 250) == 1


def test_sweep_limit_bounds_work():
    m = BucketMap(rate=100, burst=1, idle_ttl=1)
    for i in range(50):
        m.take(T0, i)
    assert m.sweep(T0 + 5, limit=20) == 20
    assert len(m) == 30


# --- ThrottleChain, and LevelChain (the same contract over the level interface) ----------

# Every chain case runs against the inlined in-process chain and the generic one.
CHAINS = pytest.mark.parametrize("Chain", [ThrottleChain, LevelChain])


@CHAINS
def test_chain_allows_and_takes_from_every_level(Chain):
    plan = BucketMap(rate=1, burst=10, policy="gold")
    route = TokenBucket(rate=1, burst=20, policy="route")
    server = TokenBucket(rate=1, burst=30, policy="server")
    chain = Chain(route=route, server=server)
    r = chain.check(T0, plan=plan, plan_key="key1")
    assert r.allowed and r.retry_after == 0.0
    assert (r.policy, r.limit, r.remaining) == ("gold", 10, 9)
    assert route.remaining(T0) == 19 and server.remaining(T0) == 29


@CHAINS
def test_chain_refusal_drains_no_level(Chain):
    plan = TokenBucket(rate=1, burst=100, policy="plan")
    route = TokenBucket(rate=1, burst=1, policy="route")
    server = TokenBucket(rate=1, burst=100, policy="server")
    chain = Chain(route=route, server=server)
    assert chain.check(T0, plan=plan).allowed
    for _ in range(50):
        r = chain.check(T0, plan=plan)
        assert not r.allowed
        assert r.policy == "route"
        assert r.retry_after == pytest.approx(1.0)
        assert r.remaining == 0
    # Refused requests consumed nothing upstream or downstream of the refusing level.
    assert plan.remaining(T0) == 99
    assert server.remaining(T0) == 99


@CHAINS
def test_chain_order_plan_first_and_retry_after_is_max_wait(Chain):
    plan = BucketMap(rate=1, burst=1, policy="plan")  # 1 s per token
    route = TokenBucket(rate=0.25, burst=1, policy="route")  # 4 s per token
    chain = Chain(route=route)
    assert chain.check(T0, plan=plan, plan_key="k").allowed
    r = chain.check(T0 + 0.5, plan=plan, plan_key="k")
    assert not r.allowed
    assert r.retry_after == pytest.approx(3.5)  # until both allow
    assert r.policy == "route"
    # Plan refusal alone: the route level, checked after, is left intact.
    plan2 = BucketMap(rate=1, burst=1, policy="plan")
    route2 = TokenBucket(rate=1, burst=5, policy="route")
    chain2 = Chain(route=route2)
    assert chain2.check(T0, plan=plan2, plan_key="k").allowed
    r = chain2.check(T0, plan=plan2, plan_key="k")
    assert (r.allowed, r.policy) == (False, "plan")
    assert r.retry_after == pytest.approx(1.0)
    assert route2.remaining(T0) == 4
    # Another key of the same plan is its own bucket.
    assert chain2.check(T0, plan=plan2, plan_key="other").allowed


@CHAINS
def test_chain_per_client_route_and_unresolved_key_shares_one_bucket(Chain):
    route = BucketMap(rate=1, burst=1, policy="per-client")
    chain = Chain(route=route, server=TokenBucket(1000, 1000))
    assert chain.check(T0, route_key="10.0.0.1").allowed
    assert not chain.check(T0, route_key="10.0.0.1").allowed
    assert chain.check(T0, route_key="10.0.0.2").allowed
    assert chain.check(T0, route_key=None).allowed  # unresolved clients share one bucket
    assert not chain.check(T0, route_key=None).allowed


@CHAINS
def test_chain_most_restrictive_level_for_headers(Chain):
    route = TokenBucket(rate=10, burst=100, policy="route")
    server = TokenBucket(rate=1, burst=3, policy="server")
    r = Chain(route=route, server=server).check(T0)
    assert (r.policy, r.limit, r.remaining, r.window) == ("server", 3, 2, 3)
    assert r.reset == pytest.approx(1.0)


@CHAINS
def test_chain_exact_count_over_time(Chain):
    # 1,000 rps, burst 100, offered 5,000 rps for 10 s -> exactly 100 + 10,000 allowed.
    chain = Chain(route=TokenBucket(rate=1000, burst=100))
    allowed = sum(chain.check(T0 + i / 5000).allowed for i in range(50_000 + 1))
    assert allowed == 100 + 10_000


@CHAINS
def test_empty_chain_allows_without_headers(Chain):
    r = Chain().check(T0)
    assert r.allowed and r.limit is None and r.policy is None
    assert ratelimit_headers(r) == b""


def test_chain_rejects_wrong_level_types():
    with pytest.raises(TypeError):
        ThrottleChain(route=object())
    with pytest.raises(TypeError):
        ThrottleChain(server=BucketMap(1, 1))


# --- Header rendering -------------------------------------------------------------------


def test_ratelimit_headers_allowed():
    chain = ThrottleChain(route=TokenBucket(rate=100, burst=200, policy="gold"))
    r = chain.check(T0)
    assert ratelimit_headers(r) == (b'ratelimit-policy: "gold";q=200;w=2\r\n' b'ratelimit: "gold";r=199;t=1\r\n')


def test_ratelimit_headers_refused_and_retry_after():
    chain = ThrottleChain(server=TokenBucket(rate=0.5, burst=1))
    assert chain.check(T0).allowed
    r = chain.check(T0 + 0.1)
    assert not r.allowed
    assert r.retry_after == pytest.approx(1.9)
    assert ratelimit_headers(r) == (b'ratelimit-policy: "default";q=1;w=2\r\n' b'ratelimit: "default";r=0;t=2\r\n')
    assert retry_after_header(r.retry_after) == b"retry-after: 2\r\n"


def test_ratelimit_policy_name_escaped_and_window_min_1():
    b = TokenBucket(rate=10_000, burst=5_000, policy='a"b\\c')
    r = ThrottleChain(server=b).check(T0)
    assert ratelimit_headers(r).startswith(b'ratelimit-policy: "a\\"b\\\\c";q=5000;w=1\r\n')


@pytest.mark.parametrize(
    "seconds,expected",
    [(0.0, 1), (0.0001, 1), (1.0, 1), (1.2, 2), (2.0000000000001, 2), (59.5, 60),
     (math.inf, 2147483647), (1e300, 2147483647)],
)
def test_retry_after_header(seconds, expected):
    assert retry_after_header(seconds) == b"retry-after: %d\r\n" % expected
