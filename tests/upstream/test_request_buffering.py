"""Request bodies cannot pin upstream connections; slow and surplus clients are cut.

Through a real gateway on loopback: raw clients that trickle bodies and heads, the
demo upstream (echo), pools of one or two connections so a pinned connection shows
at once, and the admin API's pool telemetry.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from conftest import RawClient, base_config, build_request

pytestmark = pytest.mark.timeout(60)


def config(port: int, pool: int = 1, **limits) -> dict:
    cfg = base_config(port, routes=[
        {"route": "GET /ping", "integration": {"type": "mock", "status": 200}},
        {"route": "$default", "integration": {"type": "http", "upstream": "demo", "timeout": "5s"}}],
        limits={"head_timeout": "2s", **limits})
    cfg["upstreams"]["demo"]["pool"] = {"max_connections": pool, "wait_timeout": "3s"}
    return cfg


async def target(gw) -> dict:
    c = await RawClient.connect(gw.admin_address)
    r = await c.request("GET", "/upstreams")
    await c.close()
    return orjson.loads(r.body)["upstreams"][0]["targets"][0]


async def test_a_small_body_is_read_whole_before_a_connection_is_taken(upstream, gateway):
    gw = await gateway(config(upstream.port))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "10"}) + b"01234")
    await asyncio.sleep(0.2)  # the scenario: a body still arriving
    assert (await target(gw))["opened"] == 0
    await c.send(b"56789")
    r = await c.read_response()
    assert r.status == 200 and r.json()["body"] == "0123456789"
    assert (await target(gw))["opened"] == 1
    await c.close()


async def test_trickling_bodies_leave_the_pool_to_good_clients(upstream, gateway):
    # One upstream connection; twenty clients trickle small bodies. Before buffering,
    # the first of them held the only connection until the integration timeout.
    gw = await gateway(config(upstream.port, pool=1, min_body_rate={"bytes": 1, "per": "2s"}))
    tricklers = []
    for _ in range(20):
        c = await RawClient.connect(gw.addresses[0])
        await c.send(build_request("POST", "/echo", {"Content-Length": "1000"}) + b"x")
        tricklers.append(c)
    good = await RawClient.connect(gw.addresses[0])
    for i in range(5):
        await asyncio.gather(*(t.send(b"y") for t in tricklers))
        r = await good.request("POST", "/echo", body=b"good-%d" % i)
        assert r.status == 200 and r.json()["body"] == f"good-{i}"
    t = await target(gw)
    assert t["opened"] == 1 and t["waiters"] == 0
    for c in tricklers + [good]:
        await c.close()


async def test_a_body_slower_than_the_minimum_rate_is_408(upstream, gateway):
    gw = await gateway(config(upstream.port, min_body_rate={"bytes": "1KiB", "per": "300ms"}))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "100000"}) + b"x" * 10)
    for _ in range(20):  # 10 bytes every 50 ms: far under 1 KiB per 300 ms
        await asyncio.sleep(0.05)
        try:
            await c.send(b"x" * 10)
        except ConnectionError:
            break
    r = await c.read_response()
    assert r.status == 408
    await c.close()
    t = await target(gw)
    assert t["opened"] == 0  # it never held an upstream connection


async def test_a_large_healthy_upload_streams_through(upstream, gateway):
    gw = await gateway(config(upstream.port, min_body_rate={"bytes": "1KiB", "per": "300ms"}))
    body = bytes(range(256)) * 4096  # 1 MiB: streamed after the first 64 KiB
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("POST", "/echo", body=body)
    assert r.status == 200 and r.json()["body_length"] == len(body)
    await c.close()


async def test_the_first_head_deadline_runs_from_accept(upstream, gateway):
    gw = await gateway(config(upstream.port, head_timeout="600ms"))
    c = await RawClient.connect(gw.addresses[0])
    await asyncio.sleep(0.4)  # silent after accept
    head = build_request("GET", "/ping")
    try:
        for i in range(0, len(head), 4):  # then 0.4 s more of head: past 600 ms from accept
            await c.send(head[i:i + 4])
            await asyncio.sleep(0.04)
    except ConnectionError:
        pass
    r = await c.read_response()
    assert r.status == 408
    await c.close()


async def test_connection_caps(upstream, gateway, caplog):
    gw = await gateway(config(upstream.port, max_connections=3))
    held = [await RawClient.connect(gw.addresses[0]) for _ in range(3)]
    for c in held:
        assert (await c.request("GET", "/ping")).status == 200
    extra = await RawClient.connect(gw.addresses[0])
    assert await extra.closed(timeout=5)  # closed at accept
    assert any("limits.max_connections" in r.getMessage() for r in caplog.records)
    await held.pop().close()
    for _ in range(50):  # the slot comes back once the gateway saw the close
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("GET", "/ping")
            break
        except ConnectionError:
            await asyncio.sleep(0.05)
        finally:
            await c.close()
    assert r.status == 200
    for c in held:
        await c.close()


async def test_per_address_cap(upstream, gateway, caplog):
    gw = await gateway(config(upstream.port, max_connections_per_ip=2))
    held = [await RawClient.connect(gw.addresses[0]) for _ in range(2)]
    for c in held:
        assert (await c.request("GET", "/ping")).status == 200
    extra = await RawClient.connect(gw.addresses[0])
    assert await extra.closed(timeout=5)
    assert any("connections from 127.0.0.1" in r.getMessage() for r in caplog.records)
    stats = orjson.loads((await (await RawClient.connect(gw.admin_address)).request("GET", "/stats")).body)
    assert stats["errors"]["connection_limit"] == 1
    for c in held:
        await c.close()


def test_the_automatic_connection_cap_leaves_room_for_upstream_connections():
    import resource

    from edgeplane.config.loader import load_config
    from edgeplane.http.context import connection_cap
    from edgeplane.routing.snapshot import Snapshot

    cfg = load_config(config(9, pool=500))
    snapshot = Snapshot.__new__(Snapshot)
    snapshot.config = cfg
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert cfg.limits.max_connections == 0  # auto
    assert connection_cap(cfg.limits, snapshot) == max(256, soft - 500 - 64)
    fixed = load_config(config(9, max_connections=7))
    assert connection_cap(fixed.limits, snapshot) == 7


async def test_at_the_cap_the_oldest_connection_without_a_request_makes_room(upstream, gateway, caplog):
    gw = await gateway(config(upstream.port, max_connections=3, head_timeout="30s"))
    served = await RawClient.connect(gw.addresses[0])
    assert (await served.request("GET", "/ping")).status == 200  # has sent a request: kept
    silent = await RawClient.connect(gw.addresses[0])  # never sends a byte
    await asyncio.sleep(0.05)  # the scenario: it is the older of the two head-less ones
    trickler = await RawClient.connect(gw.addresses[0])
    await trickler.send(b"GET /pi")  # a head that never completes
    newcomer = await RawClient.connect(gw.addresses[0])
    assert (await newcomer.request("GET", "/ping")).status == 200
    assert await silent.closed(timeout=5)  # evicted: the oldest head-less connection
    another = await RawClient.connect(gw.addresses[0])
    assert (await another.request("GET", "/ping")).status == 200
    assert await trickler.closed(timeout=5)  # then the next oldest
    assert (await served.request("GET", "/ping")).status == 200  # never the served ones
    stats = orjson.loads((await (await RawClient.connect(gw.admin_address)).request("GET", "/stats")).body)
    assert stats["errors"]["connection_evicted"] == 2
    assert any("had not sent a complete request head" in r.getMessage() for r in caplog.records)
    for c in (served, newcomer, another):
        await c.close()
