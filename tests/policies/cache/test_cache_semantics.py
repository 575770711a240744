"""The response cache's HTTP semantics through a real gateway and a real scripted
upstream, counted at the upstream: hits and misses, HEAD, keys, TTL, the upstream's
Cache-Control and Vary, what is never stored, coalescing, stale_if_error."""

from __future__ import annotations

import asyncio

import pytest

from policies.cache.cache_peers import Script, ScriptedUpstream, cached_config, get

pytestmark = pytest.mark.timeout(30)


async def test_a_miss_is_stored_and_the_next_request_is_answered_without_the_upstream(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        first, second = await get(addr, "/c/a?x=1"), await get(addr, "/c/a?x=1")
        assert (first.status, first.header("x-cache")) == (200, "Miss")
        assert (second.status, second.header("x-cache"), second.body) == (200, "Hit", first.body)
        assert second.header("age") == "0" and second.header("content-type") == "text/plain"
        assert second.header("x-request-id") != first.header("x-request-id")  # the request's own id
        assert up.count("/c/a?x=1") == 1
        # HEAD is answered from the GET entry, with its length and no body
        head = await get(addr, "/c/a?x=1", method="HEAD")
        assert (head.status, head.header("x-cache"), head.body) == (200, "Hit", b"")
        assert head.header("content-length") == str(len(first.body))
        assert up.count("/c/a?x=1") == 1
        # a HEAD miss goes upstream as HEAD and stores nothing
        await get(addr, "/c/h", method="HEAD")
        assert (await get(addr, "/c/h")).header("x-cache") == "Miss"
        assert up.count("/c/h") == 2


async def test_the_default_key_is_host_path_and_query_and_a_key_list_replaces_the_query(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        for path in ("/c/a?x=1", "/c/a?x=2", "/c/a", "/c/b?x=1"):
            assert (await get(addr, path)).header("x-cache") == "Miss"
        from conftest import RawClient

        other_host = await RawClient.once(addr, "GET", "/c/a?x=1", host="other.test")
        assert other_host.header("x-cache") == "Miss"
        assert len(up.requests) == 5
    async with ScriptedUpstream() as up:
        cache = {"ttl": "60s", "key": ["$request.querystring.page", "$request.header.accept-language"]}
        gw = await gateway(cached_config(up.port, cache))
        addr = gw.addresses[0]
        en = {"accept-language": "en"}
        assert (await get(addr, "/c/list?page=1&utm=a", en)).header("x-cache") == "Miss"
        assert (await get(addr, "/c/list?utm=b&page=1", en)).header("x-cache") == "Hit"  # utm is not in the key
        assert (await get(addr, "/c/list?page=2", en)).header("x-cache") == "Miss"
        assert (await get(addr, "/c/list?page=1", {"accept-language": "fr"})).header("x-cache") == "Miss"
        assert (await get(addr, "/c/list?page=1")).header("x-cache") == "Miss"  # absent is its own value
        assert len(up.requests) == 4


async def test_an_entry_expires_after_its_ttl_and_max_age_from_the_upstream_shortens_it(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/short"] = Script(200, {"cache-control": "max-age=1"}, b"short")
        up.scripts["/c/shared"] = Script(200, {"cache-control": "max-age=0, s-maxage=1"}, b"shared")
        up.scripts["/c/long"] = Script(200, {"cache-control": "max-age=3600"}, b"long")
        gw = await gateway(cached_config(up.port, {"ttl": "2s"}))
        addr = gw.addresses[0]
        for path in ("/c/short", "/c/shared", "/c/long"):
            await get(addr, path)
            assert (await get(addr, path)).header("x-cache") == "Hit"
        await asyncio.sleep(1.2)
        assert (await get(addr, "/c/short")).header("x-cache") == "Miss"  # max-age=1 < ttl
        assert (await get(addr, "/c/shared")).header("x-cache") == "Miss"  # s-maxage wins over max-age
        assert (await get(addr, "/c/long")).header("x-cache") == "Hit"  # the route's ttl is the ceiling
        await asyncio.sleep(1.0)
        assert (await get(addr, "/c/long")).header("x-cache") == "Miss"
        assert [up.count(p) for p in ("/c/short", "/c/shared", "/c/long")] == [2, 2, 2]


@pytest.mark.parametrize("headers,status", [
    ({"cache-control": "no-store"}, 200),
    ({"cache-control": "private, max-age=60"}, 200),
    ({"cache-control": "no-cache"}, 200),
    ({"cache-control": "max-age=0"}, 200),
    ({"set-cookie": "session=1"}, 200),
    ({"vary": "*"}, 200),
    ({}, 500),
    ({}, 302),
])
async def test_what_is_never_stored(gateway, headers, status):
    async with ScriptedUpstream() as up:
        up.scripts["/c/x"] = Script(status, headers, b"body")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        answers = [await get(addr, "/c/x") for _ in range(3)]
        assert [a.status for a in answers] == [status] * 3
        assert [a.header("x-cache") for a in answers] == ["Miss"] * 3
        assert up.count("/c/x") == 3


async def test_a_404_is_stored_and_the_statuses_list_decides(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/gone"] = Script(404, {}, b'{"message":"no"}')
        up.scripts["/c/err"] = Script(503, {}, b"down")
        gw = await gateway(cached_config(up.port, {"ttl": "60s", "statuses": [200, 404, 503]}))
        addr = gw.addresses[0]
        for path in ("/c/gone", "/c/err"):
            assert (await get(addr, path)).header("x-cache") == "Miss"
            hit = await get(addr, path)
            assert hit.header("x-cache") == "Hit" and hit.status == up.scripts[path].status
        assert up.count("/c/gone") == up.count("/c/err") == 1


async def test_vary_keeps_one_variant_per_header_value(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/v"] = Script(200, {"vary": "Accept-Language"}, b"varies")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        en, fr = {"accept-language": "en"}, {"accept-language": "fr"}
        assert [(await get(addr, "/c/v", h)).header("x-cache") for h in (en, fr, en, fr, None, None)] == \
            ["Miss", "Miss", "Hit", "Hit", "Miss", "Hit"]
        assert [h.get("accept-language") for t, h in up.requests] == ["en", "fr", None]


async def test_large_responses_pass_through_unstored(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/big"] = Script(200, {}, b"x" * 5000)
        gw = await gateway(cached_config(up.port, {"ttl": "60s", "max_entry_bytes": 4096}))
        addr = gw.addresses[0]
        answers = [await get(addr, "/c/big") for _ in range(2)]
        assert [len(a.body) for a in answers] == [5000, 5000]
        assert up.count("/c/big") == 2


async def test_a_range_request_or_another_method_passes_through(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port, route="ANY /c/{proxy+}"))
        addr = gw.addresses[0]
        await get(addr, "/c/r")
        ranged = await get(addr, "/c/r", {"range": "bytes=0-1"})
        posted = await get(addr, "/c/r", method="POST")
        assert ranged.header("x-cache") is None and posted.header("x-cache") is None
        assert up.count("/c/r") == 3


async def test_the_upstream_is_asked_once_for_concurrent_misses(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/slow"] = Script(200, {}, b"slow body", delay=0.5)
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        answers = await asyncio.gather(*(get(addr, "/c/slow") for _ in range(20)))
        assert {(a.status, a.body) for a in answers} == {(200, b"slow body")}
        labels = sorted(a.header("x-cache") for a in answers)
        assert labels == ["Hit"] * 19 + ["Miss"]
        assert up.count("/c/slow") == 1


async def test_waiters_go_upstream_themselves_when_the_fill_stores_nothing(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/private"] = Script(200, {"cache-control": "private"}, b"mine", delay=0.3)
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        answers = await asyncio.gather(*(get(addr, "/c/private") for _ in range(5)))
        assert [(a.status, a.body, a.header("x-cache")) for a in answers] == [(200, b"mine", "Miss")] * 5
        assert up.count("/c/private") == 5


async def test_stale_if_error_answers_with_the_expired_entry_when_the_upstream_fails(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/s"] = Script(200, {}, b"good")
        gw = await gateway(cached_config(up.port, {"ttl": "1s", "stale_if_error": "60s"}))
        addr = gw.addresses[0]
        await get(addr, "/c/s")
        await asyncio.sleep(1.1)
        up.scripts["/c/s"] = Script(503, {}, b"down")
        stale = await get(addr, "/c/s")
        assert (stale.status, stale.body, stale.header("x-cache")) == (200, b"good", "Stale")
        up.scripts["/c/s"] = Script(0)  # the upstream drops the connection
        stale = await get(addr, "/c/s")
        assert (stale.status, stale.body, stale.header("x-cache")) == (200, b"good", "Stale")
        up.scripts["/c/s"] = Script(200, {}, b"fresh")
        fresh = await get(addr, "/c/s")
        assert (fresh.body, fresh.header("x-cache")) == (b"fresh", "Miss")
        assert (await get(addr, "/c/s")).body == b"fresh"
    # without stale_if_error the failure is the client's answer
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port, {"ttl": "1s"}))
        await get(gw.addresses[0], "/c/s")
        await asyncio.sleep(1.1)
        up.scripts["/c/s"] = Script(503, {}, b"down")
        assert (await get(gw.addresses[0], "/c/s")).status == 503


async def test_a_client_no_store_is_answered_from_the_cache_but_stores_nothing(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        nostore = {"cache-control": "no-store"}
        assert (await get(addr, "/c/n", nostore)).header("x-cache") == "Miss"
        assert (await get(addr, "/c/n")).header("x-cache") == "Miss"  # the first stored nothing
        assert (await get(addr, "/c/n", nostore)).header("x-cache") == "Hit"
        assert up.count("/c/n") == 2


async def test_cors_headers_are_added_to_hits(gateway):
    async with ScriptedUpstream() as up:
        cfg = cached_config(up.port, cors={"allow_origins": ["https://app.test"]})
        gw = await gateway(cfg)
        addr = gw.addresses[0]
        origin = {"origin": "https://app.test"}
        await get(addr, "/c/o", origin)
        hit = await get(addr, "/c/o", origin)
        assert hit.header("x-cache") == "Hit"
        assert hit.header("access-control-allow-origin") == "https://app.test"
        assert (await get(addr, "/c/o")).header("access-control-allow-origin") is None
