"""The asgi integration through a real gateway: a real Starlette app (JSON, path
parameters, root_path, request bodies, streaming, lifespan and its state, the
authorizer's verdict in request.state), a FastAPI app, the gateway's policies in front,
and apps that fail, stall or write a bad header."""

from __future__ import annotations

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config

pytestmark = pytest.mark.timeout(30)

A = "integrations.asgi.asgi_apps:"


def asgi_route(app: str, key: str = "ANY /shop/{proxy+}", **integration) -> dict:
    return {"route": key, "integration": {"type": "asgi", "app": A + app, **integration}}


async def test_a_starlette_app_serves_under_its_route(gateway):
    from integrations.asgi import asgi_apps

    asgi_apps.EVENTS.clear()
    gw = await gateway(base_config(routes=[asgi_route("app")]))
    assert asgi_apps.EVENTS == ["startup"]
    addr = gw.addresses[0]
    r = await RawClient.once(addr, "GET", "/shop/hello?a=1")
    assert r.status == 200
    got = r.json()
    assert (got["root_path"], got["route_path"], got["query"]) == ("/shop", "/hello", {"a": "1"})
    assert got["db"] == "connected"  # the lifespan's state
    assert got["authorizer"] is None and got["request_id"] == r.header("x-request-id")
    assert (await RawClient.once(addr, "GET", "/shop/items/42")).json()["item"] == "42"
    assert (await RawClient.once(addr, "GET", "/shop/nope")).status == 404  # the app's own 404
    big = b"z" * 300_000
    echoed = await RawClient.once(addr, "POST", "/shop/echo", body=big)
    assert (echoed.status, echoed.body, echoed.header("x-app")) == (200, b"300000:zzzzzzzzzz", "starlette")
    streamed = await RawClient.once(addr, "GET", "/shop/stream?n=4")
    assert streamed.chunked and streamed.body == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
    await gw.stop(drain_timeout=0.5)
    assert asgi_apps.EVENTS == ["startup", "shutdown"]


async def test_keep_alive_and_pipelining_across_app_answers(gateway):
    gw = await gateway(base_config(routes=[asgi_route("app")]))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET /shop/hello?n=1 HTTP/1.1\r\nhost: gw.test\r\n\r\n"
                 b"GET /shop/stream?n=2 HTTP/1.1\r\nhost: gw.test\r\n\r\n"
                 b"GET /shop/hello?n=3 HTTP/1.1\r\nhost: gw.test\r\n\r\n")
    first, second, third = [await c.read_response() for _ in range(3)]
    assert first.json()["query"] == {"n": "1"} and second.body == b"chunk 0\nchunk 1\n"
    assert third.json()["query"] == {"n": "3"}
    await c.close()


async def test_policies_apply_in_front_and_the_identity_reaches_request_state(gateway, tmp_path):
    from hs256 import authorizer, bearer, token

    route = asgi_route("app")
    route.update(auth="users", throttle={"rate": 1, "burst": 2})
    cfg = base_config(routes=[route])
    cfg["authorizers"] = authorizer(tmp_path)
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    assert (await RawClient.once(addr, "GET", "/shop/hello")).status == 401
    got = (await RawClient.once(addr, "GET", "/shop/hello", bearer(token("bob")))).json()
    assert got["authorizer"]["claims"]["sub"] == "bob" and got["authorizer"]["scopes"] == ["read"]
    assert (await RawClient.once(addr, "GET", "/shop/hello", bearer(token("bob")))).status == 200
    assert (await RawClient.once(addr, "GET", "/shop/hello", bearer(token("bob")))).status == 429


async def test_a_fastapi_app(gateway):
    pytest.importorskip("fastapi", reason="FastAPI is not installed (`pip install -e '.[test]'` installs it)")
    gw = await gateway(base_config(routes=[asgi_route("fast", "ANY /api/{proxy+}")]))
    r = await RawClient.once(gw.addresses[0], "GET", "/api/users/7?q=x")
    assert (r.status, r.json()) == (200, {"user_id": 7, "q": "x"})
    assert (await RawClient.once(gw.addresses[0], "GET", "/api/users/notanint")).status == 422


async def test_apps_that_fail(gateway, caplog):
    routes = [asgi_route("app"), asgi_route("silent", "GET /silent", timeout="300ms"),
              asgi_route("bad_header", "GET /bad")]
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]
    failed = await RawClient.once(addr, "GET", "/shop/fail")  # Starlette answers its own 500, then raises
    assert (failed.status, failed.body) == (500, b"Internal Server Error")
    assert any("the app failed on purpose" in (r.exc_text or "") for r in caplog.records)
    stalled = await RawClient.once(addr, "GET", "/silent")
    assert (stalled.status, stalled.json()) == (504, {"message": "Endpoint request timed out"})
    bad = await RawClient.once(addr, "GET", "/bad")
    assert bad.status == 500 and bad.header("set-cookie") is None
    assert (await RawClient.once(addr, "GET", "/shop/hello")).status == 200  # the gateway goes on


def test_an_app_that_cannot_be_imported_is_a_located_error():
    with pytest.raises(ConfigError) as exc:
        load_config(base_config(routes=[asgi_route("nothing_here")]))
    assert exc.value.errors[0].startswith("routes[0].integration.app: cannot use")


async def test_framing_stays_the_gateways(gateway):
    """An app's Content-Length that its body contradicts, or that is not a number, and a
    204 with a body: the connection is dropped (or the body dropped), never desynced."""
    routes = [asgi_route(name, f"GET /{name}") for name in ("longer", "shorter", "bad_length", "no_content",
                                                             "exits")]
    routes.append({"route": "GET /ping", "integration": {"type": "mock", "body": "pong"}})
    gw = await gateway(base_config(routes=routes))
    addr = gw.addresses[0]
    for name in ("longer", "shorter"):
        c = await RawClient.connect(addr)
        await c.send(f"GET /{name} HTTP/1.1\r\nhost: gw.test\r\n\r\nGET /ping HTTP/1.1\r\nhost: gw.test\r\n\r\n"
                     .encode())
        raw = await c.read_raw(timeout=5)  # the connection ends: nothing after the cut
        assert b"pong" not in raw and b"AAAAAAAAAA" not in raw, (name, raw)
        await c.close()
    assert (await RawClient.once(addr, "GET", "/bad_length")).status == 500
    c = await RawClient.connect(addr)
    await c.send(b"GET /no_content HTTP/1.1\r\nhost: gw.test\r\n\r\nGET /ping HTTP/1.1\r\nhost: gw.test\r\n\r\n")
    first, second = await c.read_response(), await c.read_response()
    assert (first.status, first.body, second.body) == (204, b"", b"pong")
    assert first.header("date") is not None
    await c.close()
    assert (await RawClient.once(addr, "GET", "/exits")).status == 500
    assert (await RawClient.once(addr, "GET", "/ping")).body == b"pong"  # the gateway goes on


async def test_a_starlette_websocket(gateway):
    from wsproto.events import CloseConnection

    from ws_peers import WsClient

    gw = await gateway(base_config(routes=[asgi_route("ws_app", "GET /live/{proxy+}")]))
    addr = gw.addresses[0]
    refused = await WsClient.connect(addr, "/live/echo?deny=1")
    assert refused.status == 403
    client = await WsClient.connect(addr, "/live/echo", headers={"Sec-WebSocket-Protocol": "chat, other"})
    assert client.status == 101 and client.header("sec-websocket-protocol") == b"chat"
    client.send_text("hello")
    assert await client.recv() == "echo: hello"
    client.send_bytes(b"abc")
    assert await client.recv() == b"cba"
    client.send_text("bye")
    closed = await client.recv()
    assert isinstance(closed, CloseConnection) and closed.code == 4000
    assert (await RawClient.once(addr, "GET", "/ping")).status == 404  # the gateway goes on


async def test_websocket_limits_and_protocol_errors(gateway):
    from wsproto.events import CloseConnection

    from ws_peers import WsClient

    cfg = base_config(routes=[asgi_route("ws_app", "GET /live/{proxy+}")])
    cfg["websocket"] = {"idle_timeout": "1s"}
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    idle = await WsClient.connect(addr, "/live/echo")
    closed = await idle.recv(timeout=5)
    assert isinstance(closed, CloseConnection) and closed.code == 1001
    bad = await WsClient.connect(addr, "/live/echo")
    bad.send_raw(b"\x81\x01x")  # an unmasked client frame: a protocol error
    closed = await bad.recv(timeout=5)
    assert isinstance(closed, CloseConnection) and closed.code == 1002
    old = await WsClient.connect(addr, "/live/echo", version="8")
    assert old.status == 426 and old.header("sec-websocket-version") == b"13"
