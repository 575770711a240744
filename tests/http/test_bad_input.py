"""Bad input from either side, through the real server on loopback sockets.

Client side: malformed requests get a JSON error with the right status, `connection:
close`, the socket closed after it, a counted error, and the gateway keeps serving new
connections. Pipelined bytes after a fatal error are never answered.
Upstream side: refused, reset, garbage, silent and closing upstreams become 502/504 (or
a truncated response once the head went out); a client that vanishes mid-request leaves
no busy upstream connection behind.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import orjson
import pytest

from conftest import PARSERS, RawClient, RawUpstream, base_config, build_request, read_request_head

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("no_logged_exceptions")]


H = b"Host: gw.test\r\n"


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


def config(upstream_port: int | None, parser: str = "httptools", **limits) -> dict:
    routes = [{"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}}]
    if upstream_port is not None:
        routes.append({"route": "$default", "integration": {
            "type": "http", "upstream": "demo", "timeout": "2s"}})
    lim = {"head_timeout": "2s", "keepalive_timeout": "5s"}
    lim.update(limits)
    return base_config(upstream_port, routes=routes, http={"parser": parser}, limits=lim)


async def admin_json(gw, path: str) -> dict:
    c = await RawClient.connect(gw.admin_address)
    try:
        r = await c.request("GET", path)
        assert r.status == 200
        return orjson.loads(r.body)
    finally:
        await c.close()


async def target_stats(gw) -> dict:
    return (await admin_json(gw, "/upstreams"))["upstreams"][0]["targets"][0]


async def wait_for(predicate, timeout: float = 5.0):
    """Poll an observable condition (a counter the gateway publishes) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def ping_ok(gw) -> None:
    c = await RawClient.connect(gw.addresses[0])
    try:
        r = await c.request("GET", "/ping")
        assert r.status == 200 and r.json() == {"ok": True}
    finally:
        await c.close()


def rst_close(c: RawClient) -> None:
    """Close the client socket with a RST (SO_LINGER 0): a client that vanishes."""
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.writer.transport.abort()


MESSAGES = {400: "Bad Request", 405: "Method Not Allowed", 505: "HTTP Version Not Supported"}

# (id, raw request, status). Every case is refused by both parsers the same way.
MALFORMED = [
    ("bad-request-line", b"GET/ping HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("garbage-line", b"NOT HTTP\r\n\r\n", 400),
    ("invalid-header-name", b"GET /ping HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", 400),
    ("space-before-colon", b"GET /ping HTTP/1.1\r\n" + H + b"X-A : x\r\n\r\n", 400),
    ("obs-fold", b"GET /ping HTTP/1.1\r\n" + H + b"X-A: x\r\n  folded\r\n\r\n", 400),
    ("bare-lf", b"GET /ping HTTP/1.1\n" + b"Host: gw.test\n\n", 400),
    ("bare-lf-one-line", b"GET /ping HTTP/1.1\r\nHost: gw.test\nX: y\r\n\r\n", 400),
    ("bare-cr", b"GET /ping HTTP/1.1\r\nHost: gw.test\rX: y\r\n\r\n", 400),
    ("nul-in-value", b"GET /ping HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("del-in-value", b"GET /ping HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    ("cl-and-te", b"POST /echo HTTP/1.1\r\n" + H
     + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-differing-cl", b"POST /echo HTTP/1.1\r\n" + H
     + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    ("duplicate-equal-cl", b"POST /echo HTTP/1.1\r\n" + H
     + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("cl-list", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("negative-cl", b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("non-chunked-te", b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello", 400),
    ("te-gzip-chunked", b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("te-chunked-then-gzip", b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("missing-host", b"GET /ping HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("http09", b"GET /ping\r\n\r\n", 400),
    ("http12", b"GET /ping HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("no-leading-slash", b"GET ping HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("fragment", b"GET /ping#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /pi ng HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http2", b"GET /ping HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("connect", b"CONNECT gw.test:443 HTTP/1.1\r\nHost: gw.test:443\r\n\r\n", 405),
    # Body framing errors, on a route that reads the body (the demo upstream's echo).
    ("invalid-chunk-size", b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-without-crlf", b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400),
]


@pytest.mark.parametrize("raw,status", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
async def test_malformed_request_refused_and_connection_closed(upstream, gateway, raw, status, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    try:
        await c.send(raw)
        r = await c.read_response()
        assert r.status == status
        assert r.json() == {"message": MESSAGES[status]}
        assert r.header("connection") == "close"
        assert r.header("content-type") == "application/json"
        assert len(r.header("x-request-id")) == 36
        assert await c.closed(timeout=2)
    finally:
        await c.close()
    await ping_ok(gw)  # a new connection right after is served
    stats = await admin_json(gw, "/stats")
    assert stats["errors"] == {str(status): 1}  # counted once
    assert stats["requests_total"] == 2
    target = await target_stats(gw)
    assert target["in_use"] == 0


async def test_error_is_logged_once_without_exception_text(upstream, gateway, tmp_path):
    log_path = tmp_path / "access.log"
    cfg = config(upstream.port)
    cfg["access_log"] = {"destination": "file", "path": str(log_path)}
    gw = await gateway(cfg)
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET /ping HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n")
    r = await c.read_response()
    assert r.status == 400 and r.body == b'{"message":"Bad Request"}'
    assert await c.closed(timeout=2)
    await c.close()
    gw._access_log.flush(wait=2.0)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert len(lines) == 1
    assert lines[0]["status"] == 400 and lines[0]["error"].startswith("malformed request")


async def test_each_error_counted_and_logged_once(upstream, gateway, tmp_path):
    """One access-log line and one counter increment per failed request, whatever failed."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    log_path = tmp_path / "access.log"
    cfg = config(upstream.port, head_timeout="300ms", max_head_bytes=1024, max_body_bytes=100)
    cfg["upstreams"]["dead"] = {"targets": [f"http://127.0.0.1:{dead_port}"]}
    cfg["routes"][1:] = [  # no $default: unmatched requests get 404
        {"route": "POST /echo", "integration": {"type": "http", "upstream": "demo"}},
        {"route": "GET /slow/{proxy+}", "integration": {"type": "http", "upstream": "demo",
                                                        "path": "/{proxy}", "timeout": "300ms"}},
        {"route": "GET /dead", "integration": {"type": "http", "upstream": "dead"}},
    ]
    cfg["access_log"] = {"destination": "file", "path": str(log_path)}
    gw = await gateway(cfg)
    sends = [
        (b"GET /ping HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", 400),
        (build_request("GET", "/ping", {"X-Big": "b" * 2000}), 431),
        (build_request("POST", "/echo", {"Content-Length": "101"}), 413),
        (b"GET /ping HTTP/1.1\r\n" + H, 408),
        (build_request("GET", "/slow/delay/2000"), 504),
        (build_request("GET", "/dead"), 502),
        (build_request("POST", "/ping", {"Content-Length": "0"}), 404),
        (build_request("GET", "/ping"), 200),
    ]
    for raw, status in sends:
        c = await RawClient.connect(gw.addresses[0])
        await c.send(raw)
        r = await c.read_response()
        assert r.status == status
        assert set(r.json()) == ({"message"} if status != 200 else {"ok"})
        await c.close()
    stats = await admin_json(gw, "/stats")
    assert stats["errors"] == {"400": 1, "404": 1, "408": 1, "413": 1, "431": 1, "502": 1, "504": 1}
    gw._access_log.flush(wait=2.0)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert sorted(line["status"] for line in lines) == sorted(status for _, status in sends)
    for line in lines:
        assert (line["error"] is None) == (line["status"] == 200)


async def test_invalid_chunk_on_mock_route_is_not_answered_twice(upstream, gateway, parser):
    """A mock answers at the end of the head; the bad chunk that follows in the same read
    must not produce a second response, count or log line."""
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET /ping HTTP/1.1\r\n" + H
                 + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    raw = await c.read_raw(timeout=2)
    await c.close()
    assert raw.count(b"HTTP/1.1 ") == 1
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in raw
    stats = await admin_json(gw, "/stats")
    assert stats["requests_total"] == 1 and stats["errors"] == {}


async def test_pipelined_request_then_garbage(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("GET", "/ping") + build_request("POST", "/echo", body=b"two")
                 + b"GARBAGE\r\n\r\n" + build_request("GET", "/ping"))
    r1 = await c.read_response()
    r2 = await c.read_response()
    r3 = await c.read_response()
    assert (r1.status, r1.json()) == (200, {"ok": True})
    assert r1.header("connection") is None
    assert r2.status == 200 and r2.json()["body"] == "two"
    assert r3.status == 400 and r3.json() == {"message": "Bad Request"}
    assert r3.header("connection") == "close"
    assert await c.closed(timeout=2)  # the request after the garbage is never answered
    await c.close()
    stats = await admin_json(gw, "/stats")
    assert stats["requests_total"] == 3 and stats["errors"] == {"400": 1}


@pytest.mark.parametrize("first", [
    build_request("GET", "/ping", {"Connection": "close"}),
    build_request("POST", "/echo", {"Connection": "close"}, body=b"x"),
    b"GET /ping HTTP/1.0\r\n\r\n",
], ids=["mock-close", "proxy-close", "http10"])
async def test_nothing_answered_after_connection_close(upstream, gateway, parser, first):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(first + build_request("GET", "/ping") + b"GARBAGE\r\n\r\n")
    raw = await c.read_raw(timeout=3)
    await c.close()
    assert raw.count(b"HTTP/1.") == 1 and b" 200 OK\r\n" in raw
    stats = await admin_json(gw, "/stats")
    assert stats["requests_total"] == 1 and stats["errors"] == {}


async def test_expect_other_than_continue_is_417(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET /ping HTTP/1.1\r\n" + H + b"Expect: something\r\n\r\n")
    r = await c.read_response()
    assert r.status == 417 and set(r.json()) == {"message"}
    assert await c.closed(timeout=2)
    await c.close()


# ---------------------------------------------------------------------------------- upstream


async def test_upstream_refused_is_502(gateway):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on `port` now
    gw = await gateway(config(port))
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("GET", "/x")
    assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
    r = await c.request("GET", "/ping")  # the client connection stays usable
    assert r.status == 200
    await c.close()
    stats = await admin_json(gw, "/stats")
    assert stats["errors"] == {"502": 1}
    target = await target_stats(gw)
    assert target["connect_failures"] == 1 and target["in_use"] == 0


async def test_upstream_reset_mid_body_truncates_client_response(gateway):
    async def half(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with RawUpstream(half) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        await c.send(build_request("GET", "/x"))
        try:
            raw = await c.read_raw(timeout=5)
        except ConnectionResetError:
            raw = b"<reset>"
        await c.close()
        # Never a complete response: the head may have gone out, the body is cut.
        if raw != b"<reset>":
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 1000" in head
            assert len(body) < 1000
        stats = await admin_json(gw, "/stats")
        # What the client got was a cut 200, not a 502: counted as such.
        assert stats["errors"] == {"upstream_aborted": 1}
        target = await target_stats(gw)
        assert target["in_use"] == 0 and target["idle"] == 0
        await ping_ok(gw)


async def test_upstream_closes_mid_body_is_not_a_complete_response(gateway):
    async def half(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        writer.close()  # a FIN, not a reset: still short of the content-length

    async with RawUpstream(half) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        await c.send(build_request("GET", "/x"))
        try:
            raw = await c.read_raw(timeout=5)
        except ConnectionResetError:
            raw = b""
        await c.close()
        assert len(raw.partition(b"\r\n\r\n")[2]) < 1000
        target = await target_stats(gw)
        assert target["in_use"] == 0 and target["idle"] == 0


@pytest.mark.parametrize("answer", [
    b"NOT HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 OK\r\n\r\n",
], ids=["not-http", "duplicate-cl", "cl-and-te", "bad-header-name", "obs-fold", "no-status"])
async def test_upstream_garbage_is_502(gateway, answer):
    async def garbage(reader, writer):
        await read_request_head(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()  # keep the socket open: the gateway must give up on its own

    async with RawUpstream(garbage) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        r = await c.request("GET", "/x")
        assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
        assert r.header("connection") is None  # the client did nothing wrong
        await c.close()
        target = await target_stats(gw)
        assert target["closed"] == {"invalid_response": 1} and target["in_use"] == 0


async def test_upstream_bad_chunk_after_head_truncates_client_response(gateway):
    async def bad_chunk(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the scenario: the head is relayed before the bad chunk
        writer.write(b"zz\r\n")
        await writer.drain()
        await reader.read()

    async with RawUpstream(bad_chunk) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        await c.send(build_request("GET", "/x"))
        try:
            raw = await c.read_raw(timeout=5)
        except ConnectionResetError:
            raw = b""
        await c.close()
        assert not raw.endswith(b"0\r\n\r\n")  # never a properly ended chunked body
        target = await target_stats(gw)
        assert target["closed"] == {"invalid_response": 1} and target["in_use"] == 0
        # the client got the 200 head and a cut body, not a 502
        assert (await admin_json(gw, "/stats"))["errors"] == {"upstream_aborted": 1}


async def test_upstream_endless_response_head_is_cut_off(gateway):
    """An upstream that never ends its response head is dropped with 502, not buffered."""
    sent = 0

    async def endless(reader, writer):
        nonlocal sent
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        piece = b"a" * 65536
        while sent < 64 * 1024 * 1024:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)

    async with RawUpstream(endless) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        r = await c.request("GET", "/x")
        assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
        await c.close()
        assert sent < 16 * 1024 * 1024
        target = await target_stats(gw)
        assert target["closed"] == {"invalid_response": 1} and target["in_use"] == 0


async def test_upstream_never_answers_is_504(gateway):
    async def silent(reader, writer):
        await read_request_head(reader)
        await reader.read()

    async with RawUpstream(silent) as up:
        cfg = config(up.port)
        cfg["routes"][1]["integration"]["timeout"] = "300ms"
        gw = await gateway(cfg)
        c = await RawClient.connect(gw.addresses[0])
        r = await c.request("GET", "/x")
        assert r.status == 504 and r.json() == {"message": "Endpoint request timed out"}
        await c.close()
        target = await target_stats(gw)
        assert target["closed"] == {"timeout": 1} and target["in_use"] == 0


async def test_upstream_closes_without_answering_is_502(gateway):
    async def rude(reader, writer):
        await read_request_head(reader)
        writer.close()

    async with RawUpstream(rude) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        r = await c.request("GET", "/x")
        assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
        r = await c.request("GET", "/ping")
        assert r.status == 200
        await c.close()
        target = await target_stats(gw)
        assert target["in_use"] == 0 and target["idle"] == 0


async def test_upstream_invalid_status_code_is_502(gateway):
    async def weird(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 999 Nope\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawUpstream(weird) as up:
        gw = await gateway(config(up.port))
        c = await RawClient.connect(gw.addresses[0])
        r = await c.request("GET", "/x")
        assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
        await c.close()
        target = await target_stats(gw)
        assert target["in_use"] == 0 and target["idle"] == 0


# ------------------------------------------------------------------------ vanishing clients


async def test_client_vanishes_mid_body(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "100000"}) + b"0" * 70_000)
    # The exchange holds an upstream connection once more than `request_buffering`
    # (64 KiB) of the body arrived and it streams the rest.
    await wait_for(lambda: _busy(gw))
    await c.close()
    target = await wait_for(lambda: _idle_and_closed(gw, "client_aborted"))
    assert target["in_use"] == 0 and target["idle"] == 0
    await ping_ok(gw)
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("POST", "/echo", body=b"after")
    assert r.json()["body"] == "after"
    await c.close()
    stats = await admin_json(gw, "/stats")
    assert stats["errors"] == {"client_closed": 1}


@pytest.mark.parametrize("how", ["reset", "fin"])
async def test_client_vanishes_while_upstream_is_slow(upstream, gateway, how):
    gw = await gateway(config(upstream.port))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("GET", "/delay/400"))
    await wait_for(lambda: _busy(gw))
    if how == "reset":
        rst_close(c)
        # Aborted at once: the upstream connection is closed, never pooled.
        target = await wait_for(lambda: _idle_and_closed(gw, "client_aborted"))
        assert target["idle"] == 0
        stats = await admin_json(gw, "/stats")
        assert stats["errors"] == {"client_closed": 1}
    else:
        # A FIN may be a half-close (the client still reads): the gateway finishes the
        # exchange, then closes the client connection; nothing stays busy.
        await c.close()
        await wait_for(lambda: _in_use_zero_after_request(gw))
    await ping_ok(gw)
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/users/1")).status == 200
    await c.close()


async def _busy(gw) -> bool:
    return (await target_stats(gw))["in_use"] == 1


async def _in_use_zero_after_request(gw) -> bool:
    t = await target_stats(gw)
    return t["requests"] == 1 and t["in_use"] == 0 and (t["idle"] == 1 or t["closed"])


async def _idle_and_closed(gw, reason: str):
    t = await target_stats(gw)
    if t["in_use"] == 0 and t["closed"].get(reason):
        return t
    return None


async def test_half_closed_client_still_gets_its_answer(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("GET", "/delay/50"))
    c.writer.write_eof()
    r = await c.read_response()
    assert r.status == 200 and r.json()["path"] == "/delay/50"
    assert await c.closed(timeout=2)
    await c.close()
