"""Who shares an entry, and who may refresh one: the authorizer's identity in the key
unless the route is `public`, RFC 9111's rule for `Authorization` on open routes, and
AWS's invalidation policy for `Cache-Control: max-age=0` (real HS256 tokens verified by
a real JWT authorizer)."""

from __future__ import annotations

import time

import pytest

from hs256 import authorizer, bearer, token
from policies.cache.cache_peers import Script, ScriptedUpstream, cached_config, get

pytestmark = pytest.mark.timeout(30)

def jwt_config(port: int, tmp_path, cache: dict) -> dict:
    cfg = cached_config(port, cache, auth="users")
    cfg["authorizers"] = authorizer(tmp_path)
    return cfg


async def test_entries_are_per_caller_on_an_authorized_route_and_shared_when_public(gateway, tmp_path):
    async with ScriptedUpstream() as up:
        gw = await gateway(jwt_config(up.port, tmp_path, {"ttl": "60s"}))
        addr = gw.addresses[0]
        alice, bob = token("alice"), token("bob")
        alice_again = token("alice", jti="another-token", iat=int(time.time()) - 5)  # same caller, new token
        labels = [(await get(addr, "/c/me", bearer(t))).header("x-cache") for t in (alice, bob, alice_again, bob)]
        assert labels == ["Miss", "Miss", "Hit", "Hit"]
        assert up.count("/c/me") == 2
        # a different scope is a different identity (the upstream may answer differently)
        assert (await get(addr, "/c/me", bearer(token("alice", scope="admin")))).header("x-cache") == "Miss"
        # no token: the authorizer refuses before the cache is asked
        assert (await get(addr, "/c/me")).status == 401
    async with ScriptedUpstream() as up:
        gw = await gateway(jwt_config(up.port, tmp_path, {"ttl": "60s", "public": True}))
        addr = gw.addresses[0]
        labels = [(await get(addr, "/c/me", bearer(token(s)))).header("x-cache") for s in ("alice", "bob")]
        assert labels == ["Miss", "Hit"] and up.count("/c/me") == 1


async def test_a_response_to_an_authorization_header_on_an_open_route_is_stored_only_when_public(gateway):
    async with ScriptedUpstream() as up:
        up.scripts["/c/private-ish"] = Script(200, {}, b"for the caller")
        up.scripts["/c/public"] = Script(200, {"cache-control": "public, max-age=60"}, b"for all")
        gw = await gateway(cached_config(up.port))
        addr = gw.addresses[0]
        creds = {"authorization": "Basic dXNlcjpwdw=="}
        for _ in range(2):
            assert (await get(addr, "/c/private-ish", creds)).header("x-cache") == "Miss"
        assert up.count("/c/private-ish") == 2
        assert [(await get(addr, "/c/public", creds)).header("x-cache") for _ in range(2)] == ["Miss", "Hit"]


async def test_invalidation_by_an_authorized_caller_refreshes_the_entry(gateway, tmp_path):
    async with ScriptedUpstream() as up:
        cache = {"ttl": "60s", "public": True, "invalidation": {"scope": "cache:invalidate"}}
        gw = await gateway(jwt_config(up.port, tmp_path, cache))
        addr = gw.addresses[0]
        reader, admin = token("reader"), token("ops", scope="read cache:invalidate")
        first = await get(addr, "/c/x", bearer(reader))
        refresh = bearer(admin, **{"cache-control": "max-age=0"})
        refreshed = await get(addr, "/c/x", refresh)
        assert refreshed.header("x-cache") == "Refresh" and refreshed.body != first.body
        after = await get(addr, "/c/x", bearer(reader))
        assert (after.header("x-cache"), after.body) == ("Hit", refreshed.body)
        # a caller without the scope: ignored, with AWS's warning header (the default)
        ignored = await get(addr, "/c/x", bearer(reader, **{"cache-control": "max-age=0"}))
        assert (ignored.header("x-cache"), ignored.body) == ("Hit", refreshed.body)
        assert "not authorized to invalidate" in (ignored.header("warning") or "")
        assert up.count("/c/x") == 2


@pytest.mark.parametrize("invalidation,expected", [
    ({}, (200, "Hit", True)),  # no authorizer: nobody may refresh; ignored with a warning
    ({"unauthorized": "ignore"}, (200, "Hit", False)),
    ({"unauthorized": "fail_403"}, (403, None, False)),
    ({"require_authorization": False}, (200, "Refresh", False)),
])
async def test_the_unauthorized_invalidation_policy(gateway, invalidation, expected):
    async with ScriptedUpstream() as up:
        gw = await gateway(cached_config(up.port, {"ttl": "60s", "invalidation": invalidation}))
        addr = gw.addresses[0]
        await get(addr, "/c/i")
        for asked in ({"cache-control": "max-age=0"}, {"cache-control": "no-cache"}, {"pragma": "no-cache"}):
            answer = await get(addr, "/c/i", asked)
            assert (answer.status, answer.header("x-cache"), answer.header("warning") is not None) == expected
        assert up.count("/c/i") == (4 if expected[1] == "Refresh" else 1)
