"""What an attacker or a broken upstream must not get into a shared entry (each found
by a black-box review of the cache): repeated or encoded key parameters, forwarded
headers, a body cut by a reset, headers named in Connection, a GET with a body, an
Expires in the past; and that waiters for a failing fill get its answer at once
instead of trying the failing upstream again."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import RawClient
from policies.cache.cache_peers import Script, ScriptedUpstream, cached_config, get

pytestmark = pytest.mark.timeout(30)


async def test_a_repeated_or_encoded_key_parameter_does_not_share_the_plain_entry(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port, {"ttl": "60s", "key": ["$request.querystring.page"]}))
        addr = gw.addresses[0]
        poisoned = await get(addr, "/c/k?page=1&page=666")
        plain = await get(addr, "/c/k?page=1")
        assert (poisoned.header("x-cache"), plain.header("x-cache")) == ("Miss", "Miss")
        assert plain.body != poisoned.body
        assert (await get(addr, "/c/k?pag%65=666")).header("x-cache") == "Miss"
        assert (await get(addr, "/c/k")).header("x-cache") == "Miss"  # not the pag%65 entry
        assert (await get(addr, "/c/k?page=%31")).header("x-cache") == "Hit"  # %31 is 1, as the upstream reads it
        assert (await get(addr, "/c/k?page=1&utm=x")).header("x-cache") == "Hit"


async def test_forwarded_headers_are_part_of_the_key(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        evil = await get(addr, "/c/f", {"x-forwarded-host": "evil.example"})
        clean = await get(addr, "/c/f")
        assert (evil.header("x-cache"), clean.header("x-cache")) == ("Miss", "Miss")
        assert (await get(addr, "/c/f", {"x-forwarded-proto": "http"})).header("x-cache") == "Miss"
        assert (await get(addr, "/c/f")).header("x-cache") == "Hit"
        assert up.count("/c/f") == 3


async def test_a_close_delimited_body_cut_by_a_reset_is_relayed_but_never_stored(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/cut"] = Script(200, {}, b"PARTIAL", end="reset")
        up.scripts["/c/whole"] = Script(200, {}, b"WHOLE", end="close")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        for _ in range(2):
            c = await RawClient.connect(addr)
            await c.send(b"GET /c/cut HTTP/1.1\r\nhost: gw.test\r\n\r\n")
            raw = await c.read_raw(timeout=5)  # dropped: the client can tell it was cut
            assert b"PARTIAL" in raw and not raw.endswith(b"0\r\n\r\n")
            await c.close()
        assert up.count("/c/cut") == 2
        first, second = await get(addr, "/c/whole"), await get(addr, "/c/whole")
        assert (first.body, second.body, second.header("x-cache")) == (b"WHOLE", b"WHOLE", "Hit")
        assert second.header("content-length") == "5"


async def test_headers_the_upstream_names_in_connection_are_never_replayed(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/h"] = Script(200, {"connection": "keep-alive, X-Internal-Token",
                                          "x-internal-token": "secret-123", "x-public": "yes"}, b"h")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        miss, hit = await get(addr, "/c/h"), await get(addr, "/c/h")
        assert hit.header("x-cache") == "Hit"
        assert miss.header("x-internal-token") is None and hit.header("x-internal-token") is None
        assert hit.header("x-public") == "yes"


async def test_a_get_with_a_body_passes_through_the_cache(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        with_body = await RawClient.once(addr, "GET", "/c/b", body=b"what I want")
        assert with_body.header("x-cache") is None
        assert (await get(addr, "/c/b")).header("x-cache") == "Miss"
        assert up.count("/c/b") == 2


async def test_an_expires_in_the_past_is_not_stored_and_one_ahead_shortens_the_ttl(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/old"] = Script(200, {"expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, b"old")
        up.scripts["/c/bad"] = Script(200, {"expires": "0"}, b"bad")
        up.scripts["/c/soon"] = Script(200, {"date": "Sat, 05 Dec 2026 00:00:00 GMT",
                                             "expires": "Sat, 05 Dec 2026 00:00:01 GMT"}, b"soon")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        for path in ("/c/old", "/c/bad"):
            assert [(await get(addr, path)).header("x-cache") for _ in range(2)] == ["Miss", "Miss"]
        assert [(await get(addr, "/c/soon")).header("x-cache") for _ in range(2)] == ["Miss", "Hit"]
        await asyncio.sleep(1.1)
        assert (await get(addr, "/c/soon")).header("x-cache") == "Miss"


async def test_waiters_for_a_failing_fill_get_its_answer_without_asking_the_upstream_again(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/stuck"] = Script(200, {}, b"late", delay=3.0)
        cfg = cached_config(up.port)
        cfg["routes"][0]["integration"]["timeout"] = "1s"
        gw = await gateway(cfg)
        answers = await asyncio.gather(*(get(gw.addresses[0], "/c/stuck") for _ in range(10)))
        assert [a.status for a in answers] == [504] * 10
        assert up.count("/c/stuck") == 1


async def test_the_admin_flush_takes_a_path_as_clients_send_it(gateway):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        await get(addr, "/c/a%20b")
        await get(addr, "/c/x/../y")  # stored under its normalised path, /c/y
        for target, flushed in (("/cache?path=/c/a%20b", 1), ("/cache?path=/c/./y", 1)):
            answer = await RawClient.once(gw.admin_address, "DELETE", target)
            assert (answer.status, json.loads(answer.body)["flushed"]) == (200, flushed)
        answer = await RawClient.once(gw.admin_address, "DELETE", "/cache?path=c/y")
        assert answer.status == 400 and "must start with '/'" in json.loads(answer.body)["message"]
