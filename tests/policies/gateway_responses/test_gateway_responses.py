"""Gateway responses through a real gateway: per AWS response type, the status, headers
and body template of the answers the gateway gives itself (a real JWT authorizer, a
real throttle, IP rules, a dead upstream); an upstream's own errors are never rewritten;
templates are checked at load."""

from __future__ import annotations

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config
from hs256 import authorizer, bearer, token

pytestmark = pytest.mark.timeout(30)


def config(tmp_path, upstream_port: int, responses: dict) -> dict:
    routes = [{"route": "GET /me", "auth": "users", "integration": {"type": "mock", "body": {"me": True}}},
              {"route": "GET /slow", "throttle": {"rate": 1, "burst": 1},
               "integration": {"type": "mock", "body": "ok"}},
              {"route": "GET /private", "ip_rules": {"deny": ["127.0.0.1"]}, "integration": {"type": "mock"}},
              {"route": "GET /dead", "integration": {"type": "http", "upstream": "dead"}},
              {"route": "GET /up/{proxy+}", "integration": {"type": "http", "upstream": "demo", "path": "/{proxy}"}}]
    cfg = base_config(upstream_port, routes=routes)
    cfg["upstreams"]["dead"] = {"targets": ["http://127.0.0.1:9"]}
    cfg["authorizers"] = authorizer(tmp_path)
    cfg["gateway_responses"] = responses
    return cfg


async def test_each_type_gets_its_own_answer(gateway, upstream, tmp_path):
    responses = {
        "UNAUTHORIZED": {"status": 401, "headers": {"WWW-Authenticate": 'Bearer realm="api"',
                                                    "Access-Control-Allow-Origin": "*"},
                         "body": '{"error": $context.error.messageString, "type": "$context.error.responseType", '
                                 '"requestId": "$context.requestId"}'},
        "MISSING_AUTHENTICATION_TOKEN": {"body": '{"error": "log in first"}'},
        "THROTTLED": {"status": 503, "body": "slow down", "content_type": "text/plain"},
        "WAF_FILTERED": {"body": '{"blocked": "$context.identity.sourceIp"}'},
        "RESOURCE_NOT_FOUND": {"body": '{"nothing at": "$context.path"}'},
        "DEFAULT_5XX": {"headers": {"Retry-After": "5"}, "body": '{"oops": "$context.error.message"}'},
    }
    gw = await gateway(config(tmp_path, upstream.port, responses))
    addr = gw.addresses[0]
    missing = await RawClient.once(addr, "GET", "/me")
    assert (missing.status, missing.json()) == (401, {"error": "log in first"})
    bad = await RawClient.once(addr, "GET", "/me", {"authorization": "Bearer nope"})
    got = bad.json()
    assert bad.status == 401 and got["error"] == "Unauthorized" and got["type"] == "UNAUTHORIZED"
    assert got["requestId"] == bad.header("x-request-id")
    assert bad.header("access-control-allow-origin") == "*"
    assert (await RawClient.once(addr, "GET", "/me", bearer(token("ann")))).json() == {"me": True}
    assert (await RawClient.once(addr, "GET", "/slow")).status == 200
    throttled = await RawClient.once(addr, "GET", "/slow")
    assert (throttled.status, throttled.body, throttled.header("content-type")) == (503, b"slow down", "text/plain")
    waf = await RawClient.once(addr, "GET", "/private")
    assert (waf.status, waf.json()) == (403, {"blocked": "127.0.0.1"})
    missing_route = await RawClient.once(addr, "GET", "/nowhere")
    assert (missing_route.status, missing_route.json()) == (404, {"nothing at": "/nowhere"})
    dead = await RawClient.once(addr, "GET", "/dead")
    assert (dead.status, dead.json(), dead.header("retry-after")) == (502, {"oops": "Bad Gateway"}, "5")
    # an upstream's own 503 is its answer, not the gateway's
    upstreams_own = await RawClient.once(addr, "GET", "/up/status/503")
    assert upstreams_own.status == 503 and upstreams_own.json() == {"status": 503}


async def test_without_an_entry_the_aws_default_stays(gateway, upstream, tmp_path):
    gw = await gateway(config(tmp_path, upstream.port, {"THROTTLED": {"body": "x"}}))
    r = await RawClient.once(gw.addresses[0], "GET", "/me")
    assert (r.status, r.json()) == (401, {"message": "Unauthorized"})


def test_bad_entries_are_located(tmp_path):
    def errors(responses: dict) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(config(tmp_path, 1, responses))
        return exc.value.errors

    assert errors({"NOT_A_TYPE": {}})[0].startswith("gateway_responses: unknown key 'NOT_A_TYPE'")
    assert errors({"THROTTLED": {"body": "$context.secret"}})[0].startswith(
        "gateway_responses.THROTTLED.body: unknown variable $context.secret")
    assert errors({"THROTTLED": {"headers": {"Content-Length": "1"}}})[0].startswith(
        "gateway_responses.THROTTLED.headers.Content-Length: managed by the gateway")
    assert errors({"THROTTLED": {"status": 200}})[0].startswith("gateway_responses.THROTTLED.status")
