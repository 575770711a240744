"""The function integration through a real gateway and real sockets: handlers written
as AWS writes Lambda handlers, the 2.0 and 1.0 events, the answer as AWS reads it
(statusCode, headers, cookies, base64 bodies, any JSON value), sync handlers in the
pool without blocking the loop, timeouts, exceptions, malformed answers, payload
limits, authorizer claims in the event, throttles in front, metrics."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from conftest import REPO, RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config

pytestmark = pytest.mark.timeout(30)

H = "integrations.function.fn_handlers:"


def fn_route(handler: str, key: str = "ANY /fn/{proxy+}", **integration) -> dict:
    return {"route": key, "integration": {"type": "function", "handler": H + handler, **integration}}


async def test_an_aws_example_handler_runs_unchanged(gateway):
    gw = await gateway(base_config(routes=[fn_route("lambda_handler")]))
    r = await RawClient.once(gw.addresses[0], "GET", "/fn/x")
    assert (r.status, r.body, r.header("content-type")) == (200, b'"Hello from Lambda!"', "application/json")


async def test_the_2_0_event_is_built_as_aws_builds_it(gateway):
    gw = await gateway(base_config(routes=[fn_route("echo", "POST /fn/{id}")]))
    r = await RawClient.once(gw.addresses[0], "POST", "/fn/42?a=1&a=2&b=x%20y",
                             {"cookie": "c1=v1; c2=v2", "x-multi": "one", "user-agent": "tester/1",
                              "content-type": "application/json"}, body=b'{"k": "v"}')
    assert r.status == 200 and r.header("x-fn") == "echo"
    got = r.json()
    e = got["event"]
    assert e["version"] == "2.0" and e["routeKey"] == "POST /fn/{id}"
    assert (e["rawPath"], e["rawQueryString"]) == ("/fn/42", "a=1&a=2&b=x%20y")
    assert e["cookies"] == ["c1=v1", "c2=v2"] and "cookie" not in e["headers"]
    assert e["headers"]["x-multi"] == "one" and e["headers"]["user-agent"] == "tester/1"
    assert e["queryStringParameters"] == {"a": "1,2", "b": "x y"}
    assert e["pathParameters"] == {"id": "42"}
    assert (e["body"], e["isBase64Encoded"]) == ('{"k": "v"}', False)
    ctx = e["requestContext"]
    assert ctx["http"] == {"method": "POST", "path": "/fn/42", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                           "userAgent": "tester/1"}
    assert ctx["routeKey"] == "POST /fn/{id}" and ctx["stage"] == "$default"
    assert ctx["requestId"] == r.header("x-request-id") == got["request_id"]
    assert isinstance(ctx["timeEpoch"], int) and ctx["domainName"] == "gw.test"
    assert {"accountId", "apiId", "time"} <= set(ctx)
    assert "stageVariables" not in e and "authorizer" not in ctx
    assert got["function_name"] == H + "echo" and 0 < got["remaining_ms"] <= 29_000
    assert got["thread"].startswith("edgeplane-fn")  # a sync handler runs in the pool


async def test_a_binary_body_is_base64_both_ways_and_cookies_become_set_cookie(gateway):
    gw = await gateway(base_config(routes=[fn_route("echo", "POST /fn/echo"), fn_route("binary", "GET /fn/png"),
                                           fn_route("async_echo", "POST /fn/async")]))
    addr = gw.addresses[0]
    r = await RawClient.once(addr, "POST", "/fn/echo", {"content-type": "application/octet-stream"},
                             body=b"\x00\xff\xfe")
    e = r.json()["event"]
    assert (e["body"], e["isBase64Encoded"]) == ("AP/+", True)
    png = await RawClient.once(addr, "GET", "/fn/png")
    assert (png.body, png.header("content-type")) == (b"\x89PNG\r\n\x00\xff", "image/png")
    made = await RawClient.once(addr, "POST", "/fn/async", {"content-type": "text/plain"}, body=b"hello")
    assert (made.status, made.body) == (201, b"hello")
    assert made.header_all("set-cookie") == ["a=1; Path=/", "b=2"]


async def test_any_other_json_value_is_a_200_json_response(gateway):
    gw = await gateway(base_config(routes=[fn_route("plain_value")]))
    r = await RawClient.once(gw.addresses[0], "GET", "/fn/v")
    assert (r.status, r.json(), r.header("content-type")) == (200, {"items": [1, 2, 3]}, "application/json")


async def test_the_1_0_event(gateway):
    gw = await gateway(base_config(routes=[fn_route("echo", "GET /fn/{id}", payload_format="1.0")]))
    r = await RawClient.once(gw.addresses[0], "GET", "/fn/7?a=1&a=2", {"x-two": "1"})
    e = r.json()["event"]
    assert (e["version"], e["httpMethod"], e["resource"], e["path"]) == ("1.0", "GET", "/fn/{id}", "/fn/7")
    assert e["queryStringParameters"] == {"a": "2"} and e["multiValueQueryStringParameters"] == {"a": ["1", "2"]}
    assert e["multiValueHeaders"]["x-two"] == ["1"] and e["headers"]["x-two"] == "1"
    assert e["pathParameters"] == {"id": "7"} and e["stageVariables"] is None and e["body"] is None
    assert e["requestContext"]["identity"]["sourceIp"] == "127.0.0.1"


async def test_failures_answer_as_aws_does(gateway, caplog):
    routes = [fn_route("boom", "GET /fn/boom"), fn_route("bad_status", "GET /fn/status"),
              fn_route("bad_header", "GET /fn/header"), fn_route("slow_async", "GET /fn/slow", timeout="300ms")]
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]
    with caplog.at_level(logging.ERROR, logger="edgeplane.function"):
        boom = await RawClient.once(addr, "GET", "/fn/boom")
    assert (boom.status, boom.json()) == (500, {"message": "Internal Server Error"})
    assert any("RuntimeError: the handler failed on purpose" in (r.exc_text or "") for r in caplog.records)
    for path in ("/fn/status", "/fn/header"):
        bad = await RawClient.once(addr, "GET", path)
        assert bad.status == 502 and bad.header("set-cookie") is None
    slow = await RawClient.once(addr, "GET", "/fn/slow")
    assert (slow.status, slow.json()) == (504, {"message": "Endpoint request timed out"})
    metrics = (await RawClient.once(gw.admin_address, "GET", "/metrics")).body.decode()
    for result, n in (("error", 1), ("malformed", 2), ("timeout", 1)):
        assert f'edgeplane_function_invocations_total{{result="{result}"}} {n}' in metrics
    # the connection and the gateway go on
    assert (await RawClient.once(addr, "GET", "/fn/status")).status == 502


async def test_a_sync_handler_does_not_block_the_loop(gateway):
    routes = [fn_route("slow_sync", "GET /fn/sleep"),
              {"route": "GET /ping", "integration": {"type": "mock", "body": {"ok": True}}}]
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]
    sleeping = asyncio.ensure_future(RawClient.once(addr, "GET", "/fn/sleep"))
    await asyncio.sleep(0.2)
    ping = asyncio.ensure_future(RawClient.once(addr, "GET", "/ping"))
    done, _ = await asyncio.wait({sleeping, ping}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {ping} and ping.result().status == 200  # answered while the handler slept
    assert (await sleeping).body == b"slept"


async def test_the_payload_limit(gateway):
    cfg = base_config(routes=[fn_route("echo")])
    cfg["functions"] = {"max_payload": "1KiB", "threads": 2}
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    assert (await RawClient.once(addr, "POST", "/fn/x", body=b"x" * 2048)).status == 413
    assert (await RawClient.once(addr, "POST", "/fn/x", body=b"x" * 100)).status == 200
    # a chunked body past the limit: 413 while it is read
    c = await RawClient.connect(addr)
    await c.send(b"POST /fn/x HTTP/1.1\r\nhost: gw.test\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"800\r\n" + b"y" * 2048 + b"\r\n0\r\n\r\n")
    assert (await c.read_response()).status == 413
    await c.close()


async def test_authorizer_claims_and_throttles_apply_in_front(gateway, tmp_path):
    from hs256 import authorizer, bearer, token

    route = fn_route("echo", "GET /fn/me")
    route.update(auth="users", throttle={"rate": 1, "burst": 2})
    cfg = base_config(routes=[route])
    cfg["authorizers"] = authorizer(tmp_path)
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    assert (await RawClient.once(addr, "GET", "/fn/me")).status == 401
    r = await RawClient.once(addr, "GET", "/fn/me", bearer(token("alice", scope="read write")))
    auth = r.json()["event"]["requestContext"]["authorizer"]["jwt"]
    assert auth["claims"]["sub"] == "alice" and auth["scopes"] == ["read", "write"]
    assert (await RawClient.once(addr, "GET", "/fn/me", bearer(token("alice")))).status == 200
    assert (await RawClient.once(addr, "GET", "/fn/me", bearer(token("alice")))).status == 429


def test_a_handler_that_cannot_be_used_is_a_located_error():
    for handler, why in (("integrations.function.no_such_module:f", "ModuleNotFoundError"),
                         (H + "missing", "AttributeError"), (H + "not_callable", "not a callable")):
        with pytest.raises(ConfigError) as exc:
            load_config(base_config(routes=[{"route": "GET /f", "integration": {"type": "function",
                                                                                  "handler": handler}}]))
        assert exc.value.errors[0].startswith("routes[0].integration.handler: cannot use") and why in \
            exc.value.errors[0], exc.value.errors
    with pytest.raises(ConfigError) as exc:
        load_config(base_config(routes=[{"route": "GET /f", "integration": {"type": "function",
                                                                              "handler": "no colon"}}]))
    assert exc.value.errors[0].startswith("routes[0].integration.handler")
    assert json.dumps(load_config(base_config(routes=[fn_route("echo")])).routes[0].integration.handler)


async def test_stage_variables_reach_the_event(gateway):
    cfg = base_config(routes=[fn_route("echo", "GET /fn/{id}")])
    cfg["stages"] = {"prod": {"variables": {"table": "orders-prod"}}, "dev": {"variables": {"table": "orders-dev"}}}
    gw = await gateway(cfg)
    for stage in ("prod", "dev"):
        e = (await RawClient.once(gw.addresses[0], "GET", f"/{stage}/fn/1")).json()["event"]
        assert e["stageVariables"] == {"table": f"orders-{stage}"} and e["requestContext"]["stage"] == stage
        assert e["rawPath"] == f"/{stage}/fn/1"


async def test_what_a_black_box_review_found(gateway):
    """A handler that exits, an interim or odd statusCode, a handler's own Date, the raw
    path as sent, an IPv6 Host: each answered as AWS would, and the gateway goes on."""
    routes = [fn_route(name, f"GET /fn/{name}") for name in
              ("exits", "interrupts", "interim", "odd_digit", "own_date")] + [fn_route("echo", "GET /fn/e/{x}")]
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]
    for name, status in (("exits", 500), ("interrupts", 500), ("interim", 502), ("odd_digit", 502)):
        assert (await RawClient.once(addr, "GET", f"/fn/{name}")).status == status, name
    dated = await RawClient.once(addr, "GET", "/fn/own_date")
    assert len(dated.header_all("date")) == 1 and "1970" not in dated.header("date")
    assert dated.header("server") == "edgeplane"
    e = (await RawClient.once(addr, "GET", "/fn/e/%41b", host="[::1]:8080")).json()["event"]
    assert e["rawPath"] == "/fn/e/%41b" and e["requestContext"]["domainName"] == "::1"


async def test_a_stuck_sync_handler_keeps_its_thread_counted(gateway):
    cfg = base_config(routes=[fn_route("stuck", "GET /fn/stuck", timeout="300ms")])
    cfg["functions"] = {"threads": 1}
    gw = await gateway(cfg)
    assert (await RawClient.once(gw.addresses[0], "GET", "/fn/stuck")).status == 504
    metrics = (await RawClient.once(gw.admin_address, "GET", "/metrics")).body.decode()
    assert "edgeplane_function_pool_busy 1.0" in metrics  # the thread is still in the handler
    assert "edgeplane_function_pool_threads 1.0" in metrics


async def test_sigterm_is_not_held_by_a_stuck_handler(tmp_path, monkeypatch):
    import signal

    from runtime.test_processes import _start_serve, _stop

    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    cfg = base_config(routes=[fn_route("stuck", "GET /fn/stuck", timeout="300ms")])
    cfg["functions"] = {"threads": 1}
    proc, addr, _, _, drain = await _start_serve(tmp_path, cfg)
    try:
        assert (await RawClient.once(addr, "GET", "/fn/stuck")).status == 504
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0  # not joined on the stuck thread
    finally:
        await _stop(proc, drain)
