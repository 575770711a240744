"""Limits and timeouts of the client side, through the real server on loopback sockets:
head size and header count (431), body size (413), slow or silent clients (408 / quiet
close), idle keep-alive, the integration timeout (504) and backpressure toward a client
that does not read. Timeouts are configured small so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from conftest import PARSERS, RawClient, base_config, build_request

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("no_logged_exceptions")]


MAX_HEAD = 4096


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


def config(upstream_port: int | None, parser: str = "httptools", timeout: str = "2s", **limits) -> dict:
    routes = [{"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}}]
    if upstream_port is not None:
        routes.append({"route": "$default", "integration": {
            "type": "http", "upstream": "demo", "timeout": timeout}})
    lim = {"max_head_bytes": MAX_HEAD, "head_timeout": "300ms", "keepalive_timeout": "5s"}
    lim.update(limits)
    return base_config(upstream_port, routes=routes, http={"parser": parser}, limits=lim)


async def admin_json(gw, path: str) -> dict:
    c = await RawClient.connect(gw.admin_address)
    try:
        r = await c.request("GET", path)
        return orjson.loads(r.body)
    finally:
        await c.close()


async def target_stats(gw) -> dict:
    return (await admin_json(gw, "/upstreams"))["upstreams"][0]["targets"][0]


async def ping_ok(gw) -> None:
    c = await RawClient.connect(gw.addresses[0])
    try:
        assert (await c.request("GET", "/ping")).status == 200
    finally:
        await c.close()


async def no_connections_open(gw, timeout: float = 5.0) -> None:
    """Poll the published open-connection count until it is zero."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await admin_json(gw, "/stats"))["connections_open"]:
        assert loop.time() < deadline, "client connection still open"
        await asyncio.sleep(0.02)


async def expect_error(c: RawClient, status: int, message: str) -> None:
    r = await c.read_response()
    assert r.status == status
    assert r.json() == {"message": message}
    assert r.header("connection") == "close"
    assert await c.closed(timeout=3)


# -------------------------------------------------------------------------------- head size


async def test_one_huge_header_is_431(gateway, parser):
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("GET", "/ping", {"X-Big": "a" * (MAX_HEAD + 100)}))
    await expect_error(c, 431, "Request Header Fields Too Large")
    await c.close()
    await ping_ok(gw)
    assert (await admin_json(gw, "/stats"))["errors"] == {"431": 1}


async def test_many_small_headers_over_head_limit_is_431(gateway, parser):
    gw = await gateway(config(None, parser, max_headers=1000))
    c = await RawClient.connect(gw.addresses[0])
    headers = {f"X-H{i}": "v" * 40 for i in range(MAX_HEAD // 40)}
    await c.send(build_request("GET", "/ping", headers))
    await expect_error(c, 431, "Request Header Fields Too Large")
    await c.close()


async def test_long_url_over_head_limit_is_431(gateway, parser):
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("GET", "/ping?" + "q" * (MAX_HEAD + 10)))
    await expect_error(c, 431, "Request Header Fields Too Large")
    await c.close()


async def test_header_count_over_max_headers_is_431(gateway, parser):
    gw = await gateway(config(None, parser, max_headers=20))
    c = await RawClient.connect(gw.addresses[0])
    ok = {f"X-H{i}": "v" for i in range(19)}  # + Host = 20
    r = await c.request("GET", "/ping", ok)
    assert r.status == 200
    await c.send(build_request("GET", "/ping", {**ok, "X-One-More": "v"}))
    await expect_error(c, 431, "Request Header Fields Too Large")
    await c.close()


async def test_endless_header_value_is_cut_off_near_the_limit(gateway, parser):
    """A header value that never ends, written in pieces: the gateway answers 431 once
    about max_head_bytes arrived, instead of buffering it forever."""
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    piece = b"a" * 512
    sent = 0
    await c.send(b"GET /ping HTTP/1.1\r\nHost: gw.test\r\nX-Endless: ")
    read = asyncio.ensure_future(c.reader.read(65536))
    while not read.done() and sent < 50 * MAX_HEAD:
        await c.send(piece)
        sent += len(piece)
        await asyncio.wait([read], timeout=0.005)  # pace the writes: one read per piece
    assert read.done(), "the endless header was never cut off"
    c.buffer += read.result()
    assert sent <= 3 * MAX_HEAD  # the limit, plus what a first read may have held
    await expect_error(c, 431, "Request Header Fields Too Large")
    await c.close()


async def test_valid_head_near_the_limit_in_pieces_is_accepted(gateway, parser):
    """Bytes of a head that arrives in many reads are not counted twice."""
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    raw = build_request("GET", "/ping", {f"X-H{i}": "v" * 60 for i in range(MAX_HEAD // 80)})
    assert MAX_HEAD * 3 // 4 < len(raw) < MAX_HEAD
    for i in range(0, len(raw), 256):
        await c.send(raw[i : i + 256])
        await asyncio.sleep(0.002)  # pace the writes: one read per piece
    r = await c.read_response()
    assert r.status == 200
    await c.close()


async def test_head_limit_applies_per_request_on_keepalive(gateway, parser):
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    headers = {"X-Fill": "f" * (MAX_HEAD * 2 // 3)}
    for _ in range(3):  # each head is under the limit; together they are far over it
        assert (await c.request("GET", "/ping", headers)).status == 200
    await c.close()


# -------------------------------------------------------------------------------- body size


async def test_content_length_over_limit_is_413_before_the_body(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "1001"}))  # no body sent
    await expect_error(c, 413, "Request Entity Too Large")
    await c.close()
    assert (await target_stats(gw))["requests"] == 0  # never forwarded
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("POST", "/echo", body=b"b" * 1000)  # exactly the limit is fine
    assert r.status == 200 and r.json()["body_length"] == 1000
    await c.close()


async def test_413_readable_while_the_client_is_still_sending(upstream, gateway):
    """A client that sends its large body right after the head still reads the 413."""
    gw = await gateway(config(upstream.port, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    c.writer.write(build_request("POST", "/echo", {"Content-Length": "2000000"}) + b"b" * 300_000)
    r = await c.read_response()
    assert r.status == 413 and r.json() == {"message": "Request Entity Too Large"}
    await c.close()


async def test_413_readable_by_a_client_that_sends_its_whole_body_first(upstream, gateway, parser):
    """Like `requests`: the whole body goes out before the response is read. The gateway
    closes lingering (FIN, then drops what still arrives), so this is not a reset."""
    gw = await gateway(config(upstream.port, parser, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    body = b"b" * 8_000_000
    await c.send(build_request("POST", "/echo", {"Content-Length": str(len(body))}) + body)
    await expect_error(c, 413, "Request Entity Too Large")
    await c.close()
    await no_connections_open(gw)


async def test_400_readable_by_a_client_that_keeps_sending(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GARBAGE\r\n\r\n" + b"more bytes " * 500_000)
    await expect_error(c, 400, "Bad Request")
    await c.close()


async def test_lingering_close_ends_after_the_linger_time(upstream, gateway, monkeypatch):
    from edgeplane.http import protocol
    monkeypatch.setattr(protocol, "_LINGER_SECONDS", 0.2)
    gw = await gateway(config(upstream.port, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "5000"}) + b"b" * 100)
    await expect_error(c, 413, "Request Entity Too Large")  # FIN right after the answer
    # The client neither closes nor stops: the gateway still closes after the linger time.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (await admin_json(gw, "/stats"))["connections_open"]:
        assert loop.time() < deadline, "lingering connection never closed"
        try:
            await c.send(b"b" * 100)
        except ConnectionError:
            pass
        await asyncio.sleep(0.05)
    await c.close()


async def test_chunked_body_over_limit_is_413(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
                 + b"258\r\n" + b"c" * 600 + b"\r\n")
    await c.send(b"258\r\n" + b"c" * 600 + b"\r\n")
    await expect_error(c, 413, "Request Entity Too Large")
    await c.close()
    await ping_ok(gw)
    target = await target_stats(gw)
    assert target["in_use"] == 0
    # No connection that carried the half-sent request is kept (a connect that finished
    # after the 413 may be pooled unused).
    assert all(conn["requests"] == 0 for conn in target["connections"])
    assert (await admin_json(gw, "/stats"))["errors"] == {"413": 1}


async def test_chunked_body_at_limit_is_accepted(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser, max_body_bytes=1000))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Transfer-Encoding": "chunked"})
                 + b"1f4\r\n" + b"c" * 500 + b"\r\n1f4\r\n" + b"c" * 500 + b"\r\n0\r\n\r\n")
    r = await c.read_response()
    assert r.status == 200 and r.json()["body_length"] == 1000
    await c.close()


# ----------------------------------------------------------------------------- slow clients


async def test_slowloris_partial_head_gets_408(gateway, parser):
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await c.send(b"GET /ping HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ")
    await expect_error(c, 408, "Request Timeout")
    assert loop.time() - t0 < 3  # the configured 300 ms, not the 10 s default
    await c.close()
    await ping_ok(gw)
    assert (await admin_json(gw, "/stats"))["errors"] == {"408": 1}


async def test_trickling_head_gets_408(gateway, parser):
    """The whole head must arrive within head_timeout: steady trickling does not help."""
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(b"GET /ping HTTP/1.1\r\nHost: gw.test\r\n")
    read = asyncio.ensure_future(c.reader.read(65536))
    for i in range(100):
        if read.done():
            break
        await c.send(b"X-T%d: v\r\n" % i)
        await asyncio.wait([read], timeout=0.05)
    assert read.done()
    c.buffer += read.result()
    await expect_error(c, 408, "Request Timeout")
    await c.close()


async def test_silent_client_is_closed_quietly(gateway, parser):
    gw = await gateway(config(None, parser))
    c = await RawClient.connect(gw.addresses[0])
    assert await c.read_raw(timeout=3) == b""  # EOF, no response bytes
    await c.close()
    stats = await admin_json(gw, "/stats")
    # no answer and no log line, but counted: idle connections are a load to see
    assert stats["errors"] == {"no_request": 1} and stats["requests_total"] == 0


async def test_idle_keepalive_connection_is_closed_quietly(gateway, parser):
    gw = await gateway(config(None, parser, keepalive_timeout="300ms"))
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/ping")).status == 200
    assert await c.read_raw(timeout=3) == b""
    await c.close()
    assert (await admin_json(gw, "/stats"))["errors"] == {}


async def test_keepalive_connection_serves_requests_slower_than_head_timeout(gateway, parser):
    """Idle time between requests is the keep-alive timeout's, not the head timeout's."""
    gw = await gateway(config(None, parser, keepalive_timeout="3s"))
    c = await RawClient.connect(gw.addresses[0])
    assert (await c.request("GET", "/ping")).status == 200
    await asyncio.sleep(0.5)  # the scenario: idle longer than head_timeout
    assert (await c.request("GET", "/ping")).status == 200
    await c.close()


@pytest.mark.parametrize("sent", [9, 70_000])  # held before connecting; streamed upstream
async def test_stalled_request_body_gets_408(upstream, gateway, parser, sent):
    gw = await gateway(config(upstream.port, parser, timeout="5s",
                              min_body_rate={"bytes": 1, "per": "300ms"}))
    c = await RawClient.connect(gw.addresses[0])
    await c.send(build_request("POST", "/echo", {"Content-Length": "100000"}) + b"x" * sent)
    await expect_error(c, 408, "Request Timeout")
    await c.close()
    target = await target_stats(gw)
    assert target["in_use"] == 0 and target["idle"] == 0
    # A body under `request_buffering` never took an upstream connection at all.
    assert target["opened"] == (0 if sent < 65536 else 1)


# ----------------------------------------------------------------------- integration timeout


async def test_integration_timeout_is_504_and_connection_not_reused(upstream, gateway, parser):
    gw = await gateway(config(upstream.port, parser, timeout="300ms"))
    c = await RawClient.connect(gw.addresses[0])
    r = await c.request("GET", "/delay/2000")
    assert r.status == 504
    assert r.body == b'{"message":"Endpoint request timed out"}'
    assert r.header("connection") is None  # the client connection stays usable
    target = await target_stats(gw)
    assert target["closed"] == {"timeout": 1}
    assert target["in_use"] == 0 and target["idle"] == 0
    r = await c.request("GET", "/users/1")
    assert r.status == 200 and r.json()["path"] == "/users/1"
    target = await target_stats(gw)
    assert target["opened"] == 2 and target["reused"] == 0  # a fresh connection
    await c.close()
    assert (await admin_json(gw, "/stats"))["errors"] == {"504": 1}


# ------------------------------------------------------------------------------ backpressure


async def test_client_that_does_not_read_is_not_buffered_for(upstream, gateway):
    """50 MB from the upstream to a client that reads nothing: the gateway stops reading
    the upstream once the socket buffers are full, then drops both after send_timeout."""
    total = 50_000_000
    gw = await gateway(config(upstream.port, timeout="20s", send_timeout="500ms"))
    c = await RawClient.connect(gw.addresses[0])
    c.writer.transport.pause_reading()  # the client reads nothing
    await c.send(build_request("GET", f"/bytes/{total}"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    peak = 0
    while loop.time() < deadline:
        stats = await admin_json(gw, "/stats")
        if stats["errors"].get("send_timeout"):
            break
        conns = (await target_stats(gw))["connections"]
        if conns:
            peak = max(peak, conns[0]["bytes_in"])
        await asyncio.sleep(0.05)
    assert stats["errors"] == {"send_timeout": 1}  # counted once, not also as a 499
    # What was read from the upstream fits in the socket buffers plus the gateway's
    # write buffer; far from the whole response.
    print("peak bytes read from the upstream:", peak)
    assert 0 < peak < total // 3
    target = await target_stats(gw)
    assert target["closed"] == {"client_aborted": 1} and target["in_use"] == 0
    c.writer.transport.resume_reading()
    try:
        received = len(await c.read_raw(timeout=5))
    except ConnectionResetError:
        received = 0
    assert received < total
    await c.close()
    await ping_ok(gw)


# -------------------------------------------------------------------------------- pipelining


async def test_pipelined_requests_beyond_max_pipelined_all_answered_in_order(upstream, gateway, parser):
    """Reading pauses while max_pipelined requests wait and resumes as they are answered."""
    gw = await gateway(config(upstream.port, parser, max_pipelined=2))
    c = await RawClient.connect(gw.addresses[0])
    raw = b"".join(
        build_request("POST", f"/echo/{i}", body=b"%d" % i) if i % 3 else build_request("GET", "/ping")
        for i in range(30))
    await c.send(raw)
    for i in range(30):
        r = await c.read_response()
        assert r.status == 200
        if i % 3:
            assert r.json()["path"] == f"/echo/{i}" and r.json()["body"] == str(i)
        else:
            assert r.json() == {"ok": True}
    await c.close()


async def test_pipelined_bodies_over_the_buffer_cap_are_not_lost(upstream, gateway, parser):
    """Bodies of queued requests are held up to a cap, then reading pauses: nothing lost."""
    gw = await gateway(config(upstream.port, parser))
    c = await RawClient.connect(gw.addresses[0])
    body = b"p" * 100_000
    raw = build_request("GET", "/delay/50") + build_request("POST", "/echo", body=body) * 4
    c.writer.write(raw)
    assert (await c.read_response()).status == 200
    for _ in range(4):
        r = await c.read_response()
        assert r.status == 200 and r.json()["body_length"] == len(body)
    await c.close()
