"""Weighted targets and blue/green splits, counted at real upstreams through a real gateway.

Smooth weighted round robin is exact over each cycle, so the counts are checked exactly
(the issue's bound is within 1 % over 10,000 requests). A reload that changes only the
weights keeps the upstream's pools and their connections.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config
from edgeplane.runtime.demo_upstream import DemoUpstream
from edgeplane.upstream.balance import SmoothWeighted

pytestmark = pytest.mark.timeout(90)


def test_smooth_weighted_round_robin_interleaves_and_is_exact():
    w = SmoothWeighted([5, 1, 1])
    assert "".join("abc"[w.pick()] for _ in range(7)) == "aabacaa"  # nginx's example: never aaaaabc
    counts = [0, 0, 0]
    for _ in range(700):
        counts[w.pick()] += 1
    assert counts == [500, 100, 100]
    drained = SmoothWeighted([3, 0, 1])
    assert sorted("abc"[drained.pick()] for _ in range(8)) == list("aaaaaacc")
    skip_a = SmoothWeighted([1, 1])
    assert {skip_a.pick(lambda i: i != 0) for _ in range(4)} == {1}  # an unusable member is skipped
    assert SmoothWeighted([0, 0]).pick() == -1


async def _send(addr, path: str, n: int, clients: int = 8) -> None:
    async def one(k: int) -> None:
        c = await RawClient.connect(addr)
        try:
            for _ in range(k):
                assert (await c.request("GET", path)).status == 200
        finally:
            await c.close()
    await asyncio.gather(*(one(n // clients) for _ in range(clients)))


async def test_weighted_targets_spread_by_weight_and_a_reload_reweights_without_new_pools(gateway):
    async with DemoUpstream() as a, DemoUpstream() as b, DemoUpstream() as c:
        cfg = base_config(routes=[{"route": "GET /{proxy+}", "integration": {"type": "http", "upstream": "users"}}])
        targets = [{"url": f"http://127.0.0.1:{a.port}", "weight": 90},
                   {"url": f"http://127.0.0.1:{b.port}", "weight": 10},
                   {"url": f"http://127.0.0.1:{c.port}", "weight": 0}]  # drained
        cfg["upstreams"] = {"users": {"targets": targets}}
        gw = await gateway(cfg)
        await _send(gw.addresses[0], "/x", 10_000)
        assert (a.requests, b.requests, c.requests) == (9000, 1000, 0)
        before = gw._upstreams["users"]
        pools = list(before.pools)
        reused = sum(p.reused for p in pools)
        # only the weights change: the same pools (and their idle connections) serve on
        targets[0]["weight"], targets[1]["weight"], targets[2]["weight"] = 1, 1, 2
        await gw.reload(cfg)
        assert gw._upstreams["users"] is before and before.pools == pools
        await _send(gw.addresses[0], "/x", 4_000)
        assert (a.requests - 9000, b.requests - 1000, c.requests) == (1000, 1000, 2000)
        assert sum(p.reused for p in pools) > reused + 3000  # the kept connections served on


async def test_a_split_sends_each_upstream_its_share(gateway):
    async with DemoUpstream() as blue, DemoUpstream() as green:
        cfg = base_config(routes=[{"route": "ANY /orders/{proxy+}", "integration": {
            "type": "http", "split": [{"upstream": "blue", "weight": 95}, {"upstream": "green", "weight": 5}]}}])
        cfg["upstreams"] = {"blue": {"targets": [f"http://127.0.0.1:{blue.port}"]},
                            "green": {"targets": [f"http://127.0.0.1:{green.port}"]}}
        gw = await gateway(cfg)
        await _send(gw.addresses[0], "/orders/1", 2_000)
        assert (blue.requests, green.requests) == (1900, 100)
        routes = gw._snapshot.router.table()
        assert routes[0].integration.split == (("blue", 95), ("green", 5))


async def test_a_split_skips_an_upstream_whose_targets_are_down(gateway, unused_tcp_port):
    async with DemoUpstream() as green:
        cfg = base_config(routes=[{"route": "GET /o", "integration": {
            "type": "http", "split": [{"upstream": "blue", "weight": 1}, {"upstream": "green", "weight": 1}]}}])
        cfg["upstreams"] = {"blue": {"targets": [f"http://127.0.0.1:{unused_tcp_port}"]},
                            "green": {"targets": [f"http://127.0.0.1:{green.port}"]}}
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        try:
            statuses = [(await c.request("GET", "/o")).status for _ in range(20)]
        finally:
            await c.close()
        # the first request to blue fails to connect (502); blue is then skipped for a second
        assert statuses.count(502) == 1 and green.requests == 19


@pytest.mark.parametrize(("integration", "upstreams", "error"), [
    ({"type": "http", "upstream": "a", "split": [{"upstream": "a", "weight": 1}]}, None,
     "routes[0].integration: give one of 'upstream' and 'split', not both"),
    ({"type": "http", "split": [{"upstream": "a", "weight": 0}]}, None,
     "routes[0].integration.split: every weight is 0: at least one upstream must take requests"),
    ({"type": "http", "split": [{"upstream": "a", "weight": 1}, {"upstream": "nope", "weight": 1}]}, None,
     "routes[0].integration.split[1].upstream: unknown upstream 'nope'"),
    ({"type": "http", "upstream": "a"}, {"a": {"targets": [{"url": "http://127.0.0.1:1", "weight": 0}]}},
     "upstreams.a.targets: every target has weight 0: at least one must take requests"),
    ({"type": "http", "upstream": "a"}, {"a": {"targets": [{"url": "http://127.0.0.1:1", "weight": 1001}]}},
     "upstreams.a.targets[0].weight: must be <= 1000"),
])
def test_bad_weights_and_splits_are_located_errors(integration, upstreams, error):
    cfg = base_config(routes=[{"route": "GET /x", "integration": integration}])
    cfg["upstreams"] = upstreams or {"a": {"targets": ["http://127.0.0.1:1"]}}
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


async def test_a_split_member_whose_only_live_target_is_drained_is_skipped(gateway, unused_tcp_port):
    async with DemoUpstream() as live, DemoUpstream() as green:
        cfg = base_config(routes=[{"route": "GET /o", "integration": {
            "type": "http", "split": [{"upstream": "blue", "weight": 1}, {"upstream": "green", "weight": 1}]}}])
        cfg["upstreams"] = {
            "blue": {"targets": [{"url": f"http://127.0.0.1:{unused_tcp_port}", "weight": 1},
                                 {"url": f"http://127.0.0.1:{live.port}", "weight": 0}]},  # drained
            "green": {"targets": [f"http://127.0.0.1:{green.port}"]}}
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        try:
            statuses = [(await c.request("GET", "/o")).status for _ in range(20)]
        finally:
            await c.close()
        assert statuses.count(502) == 1 and green.requests == 19 and live.requests == 0


async def test_a_reload_does_not_restart_a_splits_cycle(gateway):
    async with DemoUpstream() as blue, DemoUpstream() as green:
        cfg = base_config(routes=[
            {"route": "GET /o", "integration": {"type": "http", "split": [{"upstream": "blue", "weight": 99},
                                                                         {"upstream": "green", "weight": 1}]}},
            {"route": "GET /m", "integration": {"type": "mock", "body": {"v": 0}}}])
        cfg["upstreams"] = {"blue": {"targets": [f"http://127.0.0.1:{blue.port}"]},
                            "green": {"targets": [f"http://127.0.0.1:{green.port}"]}}
        gw = await gateway(cfg)
        for v in range(5):  # 40 requests, then a reload of something else: 200 in all
            await _send(gw.addresses[0], "/o", 40, clients=1)
            cfg["routes"][1]["integration"]["body"] = {"v": v + 1}
            await gw.reload(cfg)
        assert (blue.requests, green.requests) == (198, 2)  # 99/1 held across the reloads
