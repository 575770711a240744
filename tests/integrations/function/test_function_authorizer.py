"""A Python function as a Lambda REQUEST authorizer: simple and IAM-policy answers, the
result cache keyed by the identity sources (counted at the handler), 401 without an
identity source, 500 when it fails, its context in the function integration's event."""

from __future__ import annotations

import pytest

from conftest import RawClient, base_config
from integrations.function import fn_handlers

pytestmark = pytest.mark.timeout(30)

H = "integrations.function.fn_handlers:"


def config(authorizer: dict) -> dict:
    cfg = base_config(routes=[{"route": "GET /me", "auth": "fn",
                               "integration": {"type": "function", "handler": H + "echo"}}])
    cfg["authorizers"] = {"fn": {"type": "function", **authorizer}}
    return cfg


async def test_a_simple_response_authorizer_with_its_cache(gateway):
    fn_handlers.CALLS["authorize"] = 0
    gw = await gateway(config({"handler": H + "authorize", "result_ttl": "60s"}))
    addr = gw.addresses[0]
    assert (await RawClient.once(addr, "GET", "/me")).status == 401  # no identity source: no call
    assert fn_handlers.CALLS["authorize"] == 0
    assert (await RawClient.once(addr, "GET", "/me", {"authorization": "wrong"})).status == 403
    ok = await RawClient.once(addr, "GET", "/me", {"authorization": "secretToken"})
    assert ok.status == 200
    assert ok.json()["event"]["requestContext"]["authorizer"] == {"lambda": {"user": "ann", "tier": "gold"}}
    assert (await RawClient.once(addr, "GET", "/me", {"authorization": "secretToken"})).status == 200
    assert fn_handlers.CALLS["authorize"] == 2  # the second allowed request came from the cache


async def test_an_iam_policy_authorizer(gateway):
    gw = await gateway(config({"handler": H + "authorize_policy", "simple_responses": False,
                               "identity_source": "$request.header.x-key"}))
    addr = gw.addresses[0]
    allowed = await RawClient.once(addr, "GET", "/me", {"x-key": "let-me-in"})
    assert allowed.status == 200
    assert allowed.json()["event"]["requestContext"]["authorizer"]["lambda"]["principalId"] == "user|a1"
    assert (await RawClient.once(addr, "GET", "/me", {"x-key": "no"})).status == 403


async def test_a_failing_authorizer_is_a_500(gateway):
    gw = await gateway(config({"handler": H + "authorize_broken"}))
    r = await RawClient.once(gw.addresses[0], "GET", "/me", {"authorization": "x"})
    assert (r.status, r.json()) == (500, {"message": "Internal Server Error"})
