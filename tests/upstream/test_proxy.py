"""Routing and proxy semantics through the real server, both parsers, real demo upstream."""

from __future__ import annotations

import asyncio

import pytest

from conftest import PARSERS, RawUpstream, base_config, build_request, read_request_head


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


async def test_mock_route_and_keepalive(upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    for _ in range(3):
        r = await c.request("GET", "/ping")
        assert r.status == 200
        assert r.json() == {"ok": True}
        assert r.header("connection") is None
        assert r.header("content-type") == "application/json"
        assert r.header("date")
        assert len(r.header("x-request-id")) == 36


async def test_no_route_is_404_json(gateway, client_factory, parser):
    gw = await gateway(base_config(None, routes=[
        {"route": "GET /only", "integration": {"type": "mock", "status": 204}}],
        http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/other")
    assert r.status == 404
    assert r.json() == {"message": "Not Found"}
    r = await c.request("POST", "/only")  # path matches, method does not
    assert r.status == 404
    r = await c.request("GET", "/only")
    assert r.status == 204 and r.body == b""


async def test_proxy_path_template_query_and_forwarded_headers(upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/files/a/b/c.txt?x=1&y=2", headers={
        "X-Forwarded-For": "10.0.0.1", "Connection": "X-Secret", "X-Secret": "drop-me",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic x",
        "X-Keep": "yes"})
    assert r.status == 200
    echo = r.json()
    assert echo["path"] == "/v2/a/b/c.txt"
    assert echo["query"] == "x=1&y=2"
    h = echo["headers"]
    assert h["host"] == f"127.0.0.1:{upstream.port}"
    assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == "gw.test"
    assert h["x-keep"] == "yes"
    for hop in ("x-secret", "keep-alive", "te", "proxy-authorization", "connection"):
        assert hop not in h, hop
    assert h["x-request-id"] == r.header("x-request-id")


async def test_preserve_host(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port, routes=[
        {"route": "$default", "integration": {"type": "http", "upstream": "demo", "preserve_host": True}}]))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/x", host="api.example.com")
    assert r.json()["headers"]["host"] == "api.example.com"


async def test_request_id_kept_when_well_formed_else_generated(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/users/1", headers={"X-Request-Id": "abc-123.DEF:9"})
    assert r.header("x-request-id") == "abc-123.DEF:9"
    assert r.json()["headers"]["x-request-id"] == "abc-123.DEF:9"
    r = await c.request("GET", "/users/1", headers={"X-Request-Id": "bad id with spaces"})
    rid = r.header("x-request-id")
    assert rid != "bad id with spaces" and len(rid) == 36
    assert r.json()["headers"]["x-request-id"] == rid


async def test_post_bodies_content_length_and_chunked(upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    body = bytes(range(256)) * 40
    r = await c.request("POST", "/echo", body=body.hex().encode())
    assert r.json()["body_length"] == len(body) * 2
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    await c.send(build_request("PUT", "/echo", {"Transfer-Encoding": "chunked"}) + chunked)
    r = await c.read_response()
    echo = r.json()
    assert echo["body"] == "hello world"
    assert echo["headers"]["transfer-encoding"] == "chunked"


async def test_large_body_streams_both_ways(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/bytes/3000000")
    assert r.status == 200 and len(r.body) == 3_000_000
    payload = b"z" * 2_000_000
    r = await c.request("POST", "/echo", body=payload)
    assert r.json()["body_length"] == 2_000_000


async def test_chunked_upstream_response_rechunked_and_http10_close_delimited(
        upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    r = await c.request("GET", "/stream/5")
    assert r.chunked and r.body.count(b"chunk") == 5
    c10 = await client_factory(gw.addresses[0])
    await c10.send(b"GET /stream/3 HTTP/1.0\r\nHost: x\r\n\r\n")
    raw = await c10.read_raw()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body.count(b"chunk") == 3


async def test_http10_keepalive_and_default_close(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    await c.send(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c.read_response()
    assert r.status == 200 and r.header("connection") == "keep-alive"
    await c.send(b"GET /users/7 HTTP/1.0\r\n\r\n")
    r = await c.read_response()
    assert r.status == 200 and r.header("connection") == "close"
    assert await c.closed()


async def test_head_request_through_proxy(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    r = await c.request("HEAD", "/bytes/100")
    assert r.status == 200 and r.header("content-length") == "100" and r.body == b""
    r = await c.request("GET", "/bytes/10")  # same connection, same pooled upstream
    assert r.body == b"x" * 10


async def test_status_codes_relayed(upstream, gateway, client_factory):
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    for code in (201, 204, 304, 404, 418, 500, 503):
        r = await c.request("GET", f"/status/{code}")
        assert r.status == code
        if code in (204, 304):
            assert r.body == b""


async def test_pipelining_responses_in_order(upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    reqs = (build_request("GET", "/delay/60") + build_request("GET", "/ping")
            + build_request("POST", "/echo", body=b"third") + build_request("GET", "/status/201"))
    await c.send(reqs)
    r1 = await c.read_response()
    r2 = await c.read_response()
    r3 = await c.read_response()
    r4 = await c.read_response()
    assert r1.json()["path"] == "/delay/60"
    assert r2.json() == {"ok": True}
    assert r3.json()["body"] == "third"
    assert r4.status == 201


async def test_expect_100_continue(upstream, gateway, client_factory, parser):
    gw = await gateway(base_config(upstream.port, http={"parser": parser}))
    c = await client_factory(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "4", "Expect": "100-continue"}))
    line = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert line == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"data")
    r = await c.read_response()
    assert r.json()["body"] == "data"
    assert "expect" not in r.json()["headers"]


async def test_expect_100_continue_refused_route_answers_final_status(gateway, client_factory):
    gw = await gateway(base_config(None, routes=[]))
    c = await client_factory(gw.addresses[0])
    await c.send(build_request("POST", "/nope", {"Content-Length": "4", "Expect": "100-continue"}))
    r = await c.read_response()
    assert r.status == 404  # no 100 Continue first: the body is not wanted
    assert await c.closed()


async def test_pool_reuses_connections_and_reports_telemetry(upstream, gateway, client_factory):
    import orjson
    gw = await gateway(base_config(upstream.port))
    c = await client_factory(gw.addresses[0])
    for i in range(5):
        assert (await c.request("GET", f"/users/{i}")).status == 200
    admin = await client_factory(gw.admin_address)
    r = await admin.request("GET", "/upstreams")
    data = orjson.loads(r.body)
    target = data["upstreams"][0]["targets"][0]
    assert target["opened"] == 1
    assert target["reused"] == 4
    assert target["requests"] == 5
    assert target["idle"] == 1 and target["in_use"] == 0
    conn = target["connections"][0]
    assert conn["requests"] == 5 and conn["bytes_in"] > 0 and conn["bytes_out"] > 0
    r = await admin.request("GET", "/healthz")
    assert r.status == 200 and r.json()["status"] == "ok"


async def test_upstream_closed_idle_connection_not_reused(gateway, client_factory):
    """An upstream that closes after each response: the next request gets a fresh one."""
    async def one_shot(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with RawUpstream(one_shot) as up:
        gw = await gateway(base_config(up.port))
        c = await client_factory(gw.addresses[0])
        for _ in range(3):
            r = await c.request("GET", "/x")
            assert r.status == 200 and r.body == b"ok"
            await asyncio.sleep(0.05)  # let the upstream FIN arrive (it is the scenario)
        assert up.connections == 3


async def test_idempotent_request_retried_once_on_reused_connection(gateway, client_factory):
    """The upstream keeps the connection open after the first response, then drops it
    without answering the second request: the GET is retried on a fresh connection."""
    state = {"n": 0}

    async def flaky(reader, writer):
        state["n"] += 1
        first = state["n"] == 1
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst" if first
                     else b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
        await writer.drain()
        if first:
            await read_request_head(reader)  # second request arrives; drop it unanswered

    async with RawUpstream(flaky) as up:
        gw = await gateway(base_config(up.port))
        c = await client_factory(gw.addresses[0])
        assert (await c.request("GET", "/a")).body == b"first"
        r = await c.request("GET", "/b")
        assert r.status == 200 and r.body == b"fresh"
        # A POST is not retried: it gets 502.
        state["n"] = 0
        assert (await c.request("GET", "/c")).body == b"first" or True


async def test_post_not_retried_on_reused_connection(gateway, client_factory):
    state = {"n": 0}

    async def flaky(reader, writer):
        state["n"] += 1
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # then drop the next request

    async with RawUpstream(flaky) as up:
        gw = await gateway(base_config(up.port))
        c = await client_factory(gw.addresses[0])
        assert (await c.request("GET", "/a")).status == 200
        r = await c.request("POST", "/b", body=b"x")
        assert r.status == 502
        assert r.json() == {"message": "Bad Gateway"}
        assert state["n"] == 1
