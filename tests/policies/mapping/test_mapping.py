"""Parameter mapping through a real gateway in front of the real demo upstream (which
echoes what it received): headers, query strings and the path rewritten from request
parts, claims, context and stage variables, JSON body fields (buffered only on routes
that read them); response mapping of statuses and headers; the choke point; located
errors."""

from __future__ import annotations

import json

import pytest

from conftest import RawClient, base_config
from edgeplane.config.loader import ConfigError, load_config
from hs256 import authorizer, bearer, token

pytestmark = pytest.mark.timeout(30)


def mapped(port: int, request_parameters: dict | None = None, response_parameters: dict | None = None,
           key: str = "ANY /m/{item}", **route) -> dict:
    r: dict = {"route": key, "integration": {"type": "http", "upstream": "demo"}, **route}
    if request_parameters is not None:
        r["request_parameters"] = request_parameters
    if response_parameters is not None:
        r["response_parameters"] = response_parameters
    return base_config(port, routes=[r])


async def test_headers_query_and_path_are_mapped(gateway, upstream, tmp_path):
    cfg = mapped(upstream.port, {
        "overwrite:header.x-user": "$context.authorizer.claims.sub",
        "append:header.x-trace": "gw-$context.requestId",
        "remove:header.x-secret": "",
        "overwrite:querystring.item": "$request.path.item",
        "append:querystring.lang": "${request.header.accept-language}",
        "remove:querystring.debug": "",
        "overwrite:header.x-stage": "$stageVariables.color",
        "overwrite:path": "/v2/items/$request.path.item",
    }, auth="users")
    cfg["authorizers"] = authorizer(tmp_path)
    cfg["stages"] = {"prod": {"variables": {"color": "blue"}}}
    gw = await gateway(cfg)
    r = await RawClient.once(gw.addresses[0], "GET", "/prod/m/42?debug=1&keep=yes",
                             bearer(token("carol"), **{"x-secret": "s", "x-trace": "client", "x-user": "forged",
                                                       "accept-language": "fr"}))
    got = r.json()
    assert got["path"] == "/v2/items/42"
    assert sorted(got["query"].split("&")) == ["item=42", "keep=yes", "lang=fr"]
    headers = got["headers"]
    assert headers["x-user"] == "carol"  # the client's forged value is replaced
    assert headers["x-trace"].startswith("client,gw-") and "x-secret" not in headers
    assert headers["x-stage"] == "blue"


async def test_body_fields_are_read_only_on_routes_that_map_them(gateway, upstream):
    cfg = mapped(upstream.port, {"overwrite:header.x-order": "$request.body.order.id",
                                 "overwrite:header.x-first": "item $request.body.items[0].sku"}, key="POST /m/{item}")
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    body = json.dumps({"order": {"id": 77}, "items": [{"sku": "A-1"}]}).encode()
    got = (await RawClient.once(addr, "POST", "/m/1", {"content-type": "application/json"}, body=body)).json()
    assert got["headers"]["x-order"] == "77" and got["headers"]["x-first"] == "item A-1"
    assert got["body"] == body.decode()  # the upstream still gets the body
    # chunked, arriving after the head: held until complete, then mapped and sent
    c = await RawClient.connect(addr)
    await c.send(b"POST /m/1 HTTP/1.1\r\nhost: gw.test\r\ntransfer-encoding: chunked\r\n\r\n")
    await c.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    answer = await c.read_response()
    assert json.loads(answer.body)["headers"]["x-order"] == "77"
    await c.close()
    not_json = (await RawClient.once(addr, "POST", "/m/1", body=b"plain")).json()
    assert "x-order" not in not_json["headers"]  # an absent source skips the mapping
    too_big = await RawClient.once(addr, "POST", "/m/1", body=b"x" * (1024 * 1024 + 1))
    assert too_big.status == 413


async def test_a_mapped_value_with_a_control_character_is_never_sent(gateway, upstream):
    gw = await gateway(mapped(upstream.port, {"overwrite:header.x-q": "$request.querystring.q"}))
    r = await RawClient.once(gw.addresses[0], "GET", "/m/1?q=a%0d%0aset-cookie:%20x")
    assert r.status == 500 and upstream_received_nothing_bad(r)


def upstream_received_nothing_bad(r) -> bool:
    return b"set-cookie" not in r.body


async def test_response_mapping_by_status_and_class(gateway, upstream):
    cfg = mapped(upstream.port, response_parameters={
        "404": {"overwrite:statuscode": "200", "overwrite:header.x-was": "$response.statuscode"},
        "5XX": {"overwrite:header.x-origin-type": "$response.header.content-type", "remove:header.server": ""},
    }, key="GET /m/{proxy+}", integration={"type": "http", "upstream": "demo", "path": "/{proxy}"})
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    four = await RawClient.once(addr, "GET", "/m/status/404")
    assert (four.status, four.header("x-was")) == (200, "404")
    five = await RawClient.once(addr, "GET", "/m/status/503")
    assert five.status == 503 and five.header("x-origin-type") == "application/json"
    assert five.header("server") is None
    ok = await RawClient.once(addr, "GET", "/m/status/201")
    assert ok.status == 201 and ok.header("x-was") is None


def test_mapping_mistakes_are_located():
    def errors(**kw) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            load_config(mapped(1, **kw))
        return exc.value.errors

    assert errors(request_parameters={"overwrite:header.host": "x"}) == [
        "routes[0].request_parameters.overwrite:header.host: header 'host' is the gateway's; a mapping may not "
        "change it"]
    assert errors(request_parameters={"replace:header.x": "y"})[0].startswith(
        "routes[0].request_parameters.replace:header.x: unknown mapping")
    assert errors(request_parameters={"overwrite:header.x": "$request.nothing.y"})[0].startswith(
        "routes[0].request_parameters.overwrite:header.x: unknown source $request.nothing.y")
    assert errors(request_parameters={"overwrite:header.x": "$context.secret"})[0].startswith(
        "routes[0].request_parameters.overwrite:header.x: unknown variable $context.secret")
    assert errors(response_parameters={"2YY": {}})[0].startswith("routes[0].response_parameters.2YY")
    assert errors(response_parameters={"200": {"overwrite:querystring.a": "b"}})[0].startswith(
        "routes[0].response_parameters.200.overwrite:querystring.a: unknown mapping")
    cfg = mapped(1, {"overwrite:path": "/x"})
    cfg["routes"][0]["integration"]["path"] = "/y"
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "give one of them" in exc.value.errors[0]


async def test_what_a_black_box_review_found(gateway, upstream):
    """A status mapped to 204 carries no body (no desync); a client's value cannot make
    `overwrite:path` climb out of its prefix or smuggle syntax; reserved prefixes refused."""
    cfg = mapped(upstream.port, {"overwrite:path": "/v2/$request.querystring.p"}, key="GET /m/{proxy+}")
    cfg["routes"].append({"route": "GET /s/{code}", "integration": {"type": "http", "upstream": "demo",
                                                                      "path": "/status/{code}"},
                          "response_parameters": {"404": {"overwrite:statuscode": "$request.querystring.s"}}})
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    c = await RawClient.connect(addr)
    await c.send(b"GET /s/404?s=204 HTTP/1.1\r\nhost: gw.test\r\n\r\n"
                 b"GET /m/x?p=ok HTTP/1.1\r\nhost: gw.test\r\n\r\n")
    first, second = await c.read_response(), await c.read_response()
    assert (first.status, first.body) == (204, b"")
    assert second.status == 200 and second.json()["path"] == "/v2/ok"
    await c.close()
    interim = await RawClient.once(addr, "GET", "/s/404?s=101")
    assert interim.status == 404  # not a final status: the mapping leaves it
    for p in ("../../admin", "a/../../admin", "%2e%2e/admin"):
        r = await RawClient.once(addr, "GET", f"/m/x?p={p}")
        if r.status == 200:
            assert r.json()["path"].startswith("/v2/") and "/../" not in r.json()["path"], p
        else:
            assert r.status == 400, p
    literal = (await RawClient.once(addr, "GET", "/m/x?p=a%253Bb%5Cc")).json()["path"]
    assert literal == "/v2/a%253Bb%5Cc"  # the client's text, encoded: never a raw ";" or backslash
    with pytest.raises(ConfigError):
        load_config(mapped(1, {"overwrite:header.x-forwarded-port": "1"}))


async def test_response_body_fields_are_mapped_to_headers(gateway, upstream):
    """`$response.body.PATH`: the response is held to its end (then sent with a length);
    other routes stream as before."""
    cfg = mapped(upstream.port, response_parameters={
        "2XX": {"overwrite:header.x-echoed-path": "$response.body.path",
                "overwrite:header.x-agent": "$response.body.headers.user-agent"},
        "404": {"overwrite:statuscode": "200"}}, key="GET /m/{proxy+}")
    cfg["routes"][0]["integration"]["path"] = "/{proxy}"
    cfg["routes"].append({"route": "GET /plain/{proxy+}", "integration": {"type": "http", "upstream": "demo",
                                                                           "path": "/{proxy}"}})
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    r = await RawClient.once(addr, "GET", "/m/abc", {"user-agent": "probe/1"})
    assert (r.status, r.header("x-echoed-path"), r.header("x-agent")) == (200, "/abc", "probe/1")
    assert r.header("content-length") == str(len(r.body)) and r.json()["path"] == "/abc"
    c = await RawClient.connect(addr)  # a held response, then a streamed one on the same connection
    await c.send(b"GET /m/x HTTP/1.1\r\nhost: gw.test\r\n\r\nGET /plain/stream/3 HTTP/1.1\r\nhost: gw.test\r\n\r\n")
    first, second = await c.read_response(), await c.read_response()
    assert first.header("x-echoed-path") == "/x" and second.chunked and second.body.count(b"chunk") == 3
    await c.close()
    big = await RawClient.once(addr, "GET", "/m/bytes/2000000")  # past the 1 MiB hold: 502
    assert big.status == 502


async def test_held_responses_found_by_a_review(gateway):
    """A held body of many tiny chunks is linear work; a held body that keeps moving is
    under the idle deadline, not the head's; a cache hit keeps the route's mappings."""
    import asyncio

    from conftest import RawUpstream, read_request_head

    async def upstream(reader, writer):
        while True:
            head = await read_request_head(reader)
            if b" /tiny " in head:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b'1\r\n{\r\n'
                             + b"1\r\n \r\n" * 20000 + b'9\r\n"id": 7}\n\r\n0\r\n\r\n')
            else:  # /slow: a body that keeps moving for 1.5 s, past the 1 s timeout
                writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{"id": ')
                for ch in b'"slo"}':
                    await asyncio.sleep(0.25)
                    writer.write(bytes([ch]))
            await writer.drain()

    async with RawUpstream(upstream) as up:
        cfg = base_config(routes=[{"route": "GET /{proxy+}", "integration": {
            "type": "http", "upstream": "app", "timeout": "1s", "idle_timeout": "5s"},
            "response_parameters": {"2XX": {"overwrite:header.x-id": "$response.body.id"}}}])
        cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{up.port}"]}}
        gw = await gateway(cfg)
        addr = gw.addresses[0]
        tiny = await RawClient.once(addr, "GET", "/tiny")
        assert (tiny.status, tiny.header("x-id")) == (200, "7")
        slow = await RawClient.once(addr, "GET", "/slow")
        assert (slow.status, slow.header("x-id")) == (200, "slo")
    async with RawUpstream(upstream) as up:
        cfg["routes"][0]["cache"] = {"ttl": "60s"}
        cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{up.port}"]}}
        gw = await gateway(cfg)
        labels = [(r.header("x-cache"), r.header("x-id")) for r in
                  [await RawClient.once(gw.addresses[0], "GET", "/tiny") for _ in range(2)]]
        assert labels == [("Miss", "7"), ("Hit", "7")]
