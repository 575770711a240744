"""Running the cache: its config errors located, the capacity as a hard bound with
evictions counted, `/stats` and `/metrics`, the admin flush (one process, every worker
of `serve -w 2`), reloads keeping unchanged routes' entries, and the Redis backend
shared by two gateways through a real redis-server."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RawClient
from edgeplane.config.loader import ConfigError, load_config
from policies.cache.cache_peers import Script, ScriptedUpstream, cached_config, get

pytestmark = pytest.mark.timeout(60)


def errors(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    return exc.value.errors


def test_cache_mistakes_are_located():
    def with_cache(cache: dict, route: str = "ANY /c/{proxy+}", **extra) -> dict:
        return {**cached_config(1, cache, route), **extra}

    assert errors(with_cache({"ttl": "60s"}, route="POST /c")) == [
        "routes[0].cache: only GET and HEAD responses are cached; route 'POST /c' is POST"]
    assert errors(with_cache({"key": ["$request.body.id"]}))[0].startswith(
        "routes[0].cache.key[0]: '$request.body.id' is not $request.header.NAME")
    assert errors(with_cache({"key": ["$request.path.id"]})) == [
        "routes[0].cache.key[0]: route 'ANY /c/{proxy+}' has no path parameter {id}"]
    assert errors(with_cache({"backend": "redis"})) == [
        "routes[0].cache.backend: the redis backend needs `cluster.redis`"]
    assert errors(with_cache({"ttl": "0s"}))[0].startswith("routes[0].cache.ttl: must be >= 1s")
    assert errors(with_cache({"max_entry_bytes": "2MiB", "capacity": "1MiB"}))[0].startswith(
        "routes[0].cache.max_entry_bytes: 2097152 bytes is more than the capacity")
    assert errors(with_cache({"invalidation": {"scope": "x"}})) == [
        "routes[0].cache.invalidation.scope: a scope comes from a jwt authorizer and the "
        "route has none"]
    assert errors(with_cache({"invalidation": {"unauthorized": "deny"}}))[0].startswith(
        "routes[0].cache.invalidation.unauthorized:")
    assert errors(with_cache({"statuses": [200, 206]}))[0].startswith("routes[0].cache.statuses[1]")
    assert errors(with_cache({"capacity": 100}))[0].startswith("routes[0].cache.capacity: must be at least 4096")
    assert errors(with_cache({}, route="HEAD /c"))[0].startswith(
        "routes[0].cache: route 'HEAD /c' takes only HEAD, which never fills an entry")
    mock = cached_config(1)
    mock["routes"][0]["integration"] = {"type": "mock"}
    assert errors(mock) == ["routes[0].cache: only http integrations are cached; this "
                            "route's is 'mock'"]
    warned = load_config(with_cache({"ttl": "2h"})).warnings
    assert any(w.startswith("routes[0].cache.ttl: 7200s is past Amazon API Gateway's")
               for w in warned)
    assert any("no client may refresh an entry" in w for w in warned)


async def _admin(gw, method: str, target: str) -> tuple[int, dict]:
    answer = await RawClient.once(gw.admin_address, method, target)
    return answer.status, json.loads(answer.body)


async def test_the_capacity_is_a_hard_bound_and_evictions_are_counted(gateway):
    async with ScriptedUpstream() as up:
        for i in range(40):
            up.scripts[f"/c/{i}"] = Script(200, {}, b"x" * 1000)
        gw = await gateway(cached_config(up.port, {"ttl": "60s", "capacity": "8KiB", "max_entry_bytes": "2KiB"}))
        addr = gw.addresses[0]
        for i in range(40):
            await get(addr, f"/c/{i}")
        _, stats = await _admin(gw, "GET", "/stats")
        store = stats["cache"]["ANY /c/{proxy+}"]
        assert store["backend"] == "memory"
        assert store["bytes"] <= 8192 and store["capacity"] == 8192
        assert store["entries"] >= 5 and store["stored"] == 40
        assert store["evictions"] == 40 - store["entries"]
        # the most recent entries are the ones kept
        assert (await get(addr, "/c/39")).header("x-cache") == "Hit"
        assert (await get(addr, "/c/0")).header("x-cache") == "Miss"
        metrics = (await RawClient.once(gw.admin_address, "GET", "/metrics")).body.decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(metrics) for s in f.samples}
        labels = (("route", "ANY /c/{proxy+}"), ("stage", "$default"))
        assert samples[("edgeplane_cache_lookups_total", (("result", "hit"), *labels))] == 1
        assert samples[("edgeplane_cache_lookups_total", (("result", "miss"), *labels))] == 41
        assert samples[("edgeplane_cache_evictions_total", labels)] >= 32
        assert samples[("edgeplane_cache_bytes", labels)] <= 8192


async def test_the_admin_flush_removes_a_path_a_route_or_everything(gateway):
    async with ScriptedUpstream() as up:
        cfg = cached_config(up.port)
        cfg["routes"].append({"route": "GET /d/{proxy+}", "integration": {"type": "http", "upstream": "app"},
                              "cache": {"ttl": "60s"}})
        gw = await gateway(cfg)
        addr = gw.addresses[0]

        async def fill() -> None:
            for path in ("/c/a?v=1", "/c/a?v=2", "/c/b", "/d/a"):
                await get(addr, path)

        async def labels() -> list[str | None]:
            return [(await get(addr, p)).header("x-cache") for p in ("/c/a?v=1", "/c/a?v=2", "/c/b", "/d/a")]

        await fill()
        assert await labels() == ["Hit"] * 4
        assert await _admin(gw, "DELETE", "/cache?path=/c/a") == (200, {"flushed": 2, "workers": 1})
        assert await labels() == ["Miss", "Miss", "Hit", "Hit"]
        assert await _admin(gw, "DELETE", "/cache?route=GET%20/d/%7Bproxy%2B%7D") == (
            200, {"flushed": 1, "workers": 1})
        assert await labels() == ["Hit", "Hit", "Hit", "Miss"]
        assert await _admin(gw, "DELETE", "/cache") == (200, {"flushed": 4, "workers": 1})
        assert await labels() == ["Miss"] * 4
        status, body = await _admin(gw, "DELETE", "/cache?route=GET%20/nope")
        assert (status, body["message"]) == (404, "no cached route 'GET /nope'")
        status, body = await _admin(gw, "DELETE", "/cache?key=x")
        assert status == 400 and "unknown parameter 'key'" in body["message"]


async def test_a_reload_keeps_the_entries_of_unchanged_routes_only(gateway):
    async with ScriptedUpstream() as up:
        cfg = cached_config(up.port)
        cfg["routes"].append({"route": "GET /d/{proxy+}", "integration": {"type": "http", "upstream": "app"},
                              "cache": {"ttl": "60s"}})
        gw = await gateway(cfg)
        addr = gw.addresses[0]
        await get(addr, "/c/a")
        await get(addr, "/d/a")
        cfg["routes"][1]["cache"]["ttl"] = "30s"
        await gw.reload(cfg)
        assert [(await get(addr, p)).header("x-cache") for p in ("/c/a", "/d/a")] == ["Hit", "Miss"]


async def test_the_redis_backend_is_shared_by_two_gateways(gateway, redis_server):
    async with ScriptedUpstream() as up:
        up.scripts["/c/v"] = Script(200, {"vary": "accept-language"}, b"varied")
        cfg = cached_config(up.port, {"ttl": "60s", "backend": "redis", "capacity": "64KiB"})
        cfg["cluster"] = {"redis": redis_server.url, "timeout": "1s"}
        one, two = await gateway(cfg), await gateway(cfg)
        assert (await get(one.addresses[0], "/c/a")).header("x-cache") == "Miss"
        await asyncio.sleep(0.2)  # the store is written off the request path
        hit = await get(two.addresses[0], "/c/a")
        assert (hit.header("x-cache"), hit.body) == ("Hit", b"/c/a #1")
        en, fr = {"accept-language": "en"}, {"accept-language": "fr"}
        assert (await get(one.addresses[0], "/c/v", en)).header("x-cache") == "Miss"
        await asyncio.sleep(0.2)
        assert (await get(two.addresses[0], "/c/v", en)).header("x-cache") == "Hit"
        assert (await get(two.addresses[0], "/c/v", fr)).header("x-cache") == "Miss"
        assert up.count("/c/a") == 1 and up.count("/c/v") == 2
        # one flush reaches every host
        status, body = await _admin(one, "DELETE", "/cache?path=/c/a")
        assert (status, body["flushed"]) == (200, 1)
        assert (await get(two.addresses[0], "/c/a")).header("x-cache") == "Miss"
        # the capacity holds in Redis too: the oldest go first
        for i in range(100):
            up.scripts[f"/c/big{i}"] = Script(200, {}, b"y" * 2000)
            await get(one.addresses[0], f"/c/big{i}")
        await asyncio.sleep(0.3)
        import redis

        client = redis.Redis.from_url(redis_server.url)
        used = [int(client.get(k)) for k in client.scan_iter(match="edgeplane:cache:*used")]
        assert used and all(n <= 64 * 1024 for n in used)
        # evicted entries leave no member behind in the per-path index
        members = sum(client.scard(k) for k in client.scan_iter(match="edgeplane:cache:*:p:*"))
        entries = sum(client.zcard(k) for k in client.scan_iter(match="edgeplane:cache:*lru"))
        assert 0 < members <= entries < 100
        assert (await get(two.addresses[0], "/c/big99")).header("x-cache") == "Hit"
        assert (await get(two.addresses[0], "/c/big0")).header("x-cache") == "Miss"
        # Redis gone: lookups are misses, the requests still succeed
        redis_server.kill()
        answer = await get(two.addresses[0], "/c/big99")
        assert (answer.status, answer.header("x-cache")) == (200, "Miss")


async def test_the_admin_flush_reaches_every_worker(tmp_path):
    from runtime.test_processes import _start_serve, _stop

    async with ScriptedUpstream() as up:
        cfg = {**cached_config(up.port), "workers": 2}
        proc, addr, admin, lines, drain = await _start_serve(tmp_path, cfg)
        try:
            # each worker misses once, then hits: fill until both have the entry
            for _ in range(60):
                await get(addr, "/c/w")
                if up.count("/c/w") == 2:
                    break
            assert up.count("/c/w") == 2, "the requests never reached the second worker"
            answer = await RawClient.once(admin, "DELETE", "/cache")
            assert (answer.status, json.loads(answer.body)) == (200, {"flushed": 2, "workers": 2})
            labels = {(await get(addr, "/c/w")).header("x-cache") for _ in range(10)}
            assert "Miss" in labels and up.count("/c/w") >= 3
        finally:
            await _stop(proc, drain)
