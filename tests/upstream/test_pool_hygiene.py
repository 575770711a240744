"""Pool hygiene: a response never reaches the wrong client, and the response-head bound.

Through a real gateway in front of raw asyncio upstreams that misbehave on purpose:
bytes past the end of a response (a second full response in the same write, garbage,
a body after a HEAD answer, late bytes on an idle connection) must close that upstream
connection rather than be parsed as the next request's response; every client gets the
body its own request asked for (each request carries a unique id that the upstream
echoes). Also the gateway's own client (`upstream.client.fetch`) over the same pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import orjson
import pytest

from conftest import RawClient, RawUpstream, base_config, read_request_head
from edgeplane.config.model import PoolConfig, Target
from edgeplane.upstream.client import FetchError, fetch
from edgeplane.upstream.pool import MAX_RESPONSE_HEAD, TargetPool

pytestmark = pytest.mark.timeout(60)

EXCESS_LOG = "upstream sent data after the end of the response; connection closed"


def _response(body: bytes, extra_headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra_headers, body)


def _request_id(head: bytes) -> bytes:
    """`GET /id/<rid> HTTP/1.1` -> rid."""
    return head.split(b" ", 2)[1].rsplit(b"/", 1)[1]


class EchoUpstream:
    """Answers each request with its id as the body; `extra(n, rid)` says what to send
    after the n-th response, in the same write (b"" for nothing)."""

    def __init__(self, extra) -> None:
        self.extra = extra
        self.counter = itertools.count()
        self.over_sent = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request_head(reader)  # EOF (gateway closed it) ends the loop
            rid = _request_id(head)
            extra = self.extra(next(self.counter), rid)
            if extra:
                self.over_sent += 1
            writer.write(_response(rid) + extra)  # one write: one segment on loopback
            await writer.drain()


def _config(port: int, max_connections: int) -> dict:
    cfg = base_config(port)
    cfg["upstreams"]["demo"]["pool"] = {"max_connections": max_connections}
    return cfg


async def _telemetry(gw) -> dict:
    c = await RawClient.connect(gw.admin_address)
    try:
        r = await c.request("GET", "/upstreams")
        return orjson.loads(r.body)["upstreams"][0]["targets"][0]
    finally:
        await c.close()


async def _many_clients(gw, clients: int = 20, per_client: int = 10) -> list[tuple[str, int, bytes]]:
    """`clients` keep-alive clients, each sending `per_client` requests in turn, all at
    once: (expected id, status, body) for every request."""
    async def one(cid: int) -> list[tuple[str, int, bytes]]:
        c = await RawClient.connect(gw.addresses[0])
        try:
            out = []
            for i in range(per_client):
                rid = f"c{cid}-r{i}"
                r = await c.request("GET", f"/id/{rid}")
                out.append((rid, r.status, r.body))
            return out
        finally:
            await c.close()

    results = await asyncio.gather(*(one(cid) for cid in range(clients)))
    return [x for per in results for x in per]


def _assert_all_own(results: list[tuple[str, int, bytes]]) -> None:
    wrong = [(rid, status, body) for rid, status, body in results
             if status != 200 or body != rid.encode()]
    assert not wrong, f"{len(wrong)} of {len(results)} responses not the client's own: {wrong[:5]}"


def _excess_logs(caplog) -> int:
    return sum(1 for r in caplog.records
               if r.name == "edgeplane.pool" and r.levelno == logging.WARNING
               and EXCESS_LOG in r.getMessage())


@pytest.mark.parametrize("max_connections", [2, 4])
async def test_second_response_in_the_same_write_never_reaches_another_client(
        gateway, caplog, max_connections):
    """Every 5th response carries a second, unrequested response in the same write,
    shaped like a real answer; 20 clients share a pool of 2-4, so a waiter is always
    queued when a response completes."""
    caplog.set_level(logging.WARNING, logger="edgeplane.pool")
    echo = EchoUpstream(lambda n, rid: _response(b"stale-" + rid) if n % 5 == 4 else b"")
    async with RawUpstream(echo) as up:
        gw = await gateway(_config(up.port, max_connections))
        results = await _many_clients(gw)
        _assert_all_own(results)
        assert len(results) == 200 and echo.over_sent == 40
        t = await _telemetry(gw)
        assert t["closed"].get("excess_data") == echo.over_sent, t["closed"]
        assert t["in_use"] == 0 and t["waiters"] == 0
        # Each dirty connection was replaced; the survivors idle.
        assert t["opened"] == echo.over_sent + t["idle"], t
        assert _excess_logs(caplog) == echo.over_sent, "one warning per event"


async def test_garbage_after_a_response_closes_without_failing_anyone(gateway):
    """Non-HTTP bytes after every 4th response: the parser fails on them after the
    response completed. That response's client got it; no other client gets a 502."""
    echo = EchoUpstream(lambda n, rid: b"\x00garbage\r\n" if n % 4 == 0 else b"")
    async with RawUpstream(echo) as up:
        gw = await gateway(_config(up.port, 2))
        results = await _many_clients(gw)
        _assert_all_own(results)
        t = await _telemetry(gw)
        assert t["closed"].get("excess_data") == echo.over_sent == 50, t["closed"]
        assert "invalid_response" not in t["closed"]


async def test_trailing_crlf_after_a_response_is_not_dirty(gateway):
    """CRLF after a response: llhttp skips empty lines before a message without a
    callback; they can never be read as a response, so the connection stays pooled."""
    echo = EchoUpstream(lambda n, rid: b"\r\n\r\n")
    async with RawUpstream(echo) as up:
        gw = await gateway(_config(up.port, 1))
        c = await RawClient.connect(gw.addresses[0])
        try:
            for i in range(3):
                r = await c.request("GET", f"/id/crlf{i}")
                assert r.status == 200 and r.body == b"crlf%d" % i
        finally:
            await c.close()
        t = await _telemetry(gw)
        assert up.connections == 1 and t["reused"] == 2 and t["closed"] == {}, t


async def test_extra_bytes_on_an_idle_connection_close_it(gateway, caplog):
    """The extra bytes come in a later write, once the response was delivered and the
    connection idles: it is closed (`unsolicited_data`); the next request gets a fresh
    connection and its own response."""
    caplog.set_level(logging.WARNING, logger="edgeplane.pool")
    delivered = asyncio.Event()
    closed = asyncio.Event()

    async def late(reader, writer):
        head = await read_request_head(reader)
        writer.write(_response(_request_id(head)))
        await writer.drain()
        if delivered.is_set():
            return  # a later connection: one answer is enough
        await delivered.wait()
        writer.write(_response(b"stale"))
        await writer.drain()
        assert await reader.read() == b""  # the gateway closes its end
        closed.set()

    async with RawUpstream(late) as up:
        gw = await gateway(_config(up.port, 1))
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("GET", "/id/first")
            assert r.body == b"first"
            delivered.set()
            await asyncio.wait_for(closed.wait(), 10)
            r = await c.request("GET", "/id/second")
            assert r.status == 200 and r.body == b"second"
        finally:
            await c.close()
        assert up.connections == 2
        t = await _telemetry(gw)
        assert t["closed"].get("unsolicited_data") == 1, t["closed"]
        assert _excess_logs(caplog) == 1


async def test_body_after_a_head_response_is_excess(gateway):
    """A HEAD response ends at its head; a body sent after it is excess even though
    llhttp, not knowing the request was HEAD, would take it as that response's body."""
    async def head_with_body(reader, writer):
        while True:
            head = await read_request_head(reader)
            rid = _request_id(head)
            writer.write(_response(rid))  # with its body, HEAD or not
            await writer.drain()

    async with RawUpstream(head_with_body) as up:
        gw = await gateway(_config(up.port, 1))
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("HEAD", "/id/abc")
            assert r.status == 200 and r.header("content-length") == "3" and r.body == b""
            r = await c.request("GET", "/id/next")
            assert r.status == 200 and r.body == b"next"
        finally:
            await c.close()
        t = await _telemetry(gw)
        assert t["closed"].get("excess_data") == 1 and up.connections == 2, t


def _big_head(kind: str) -> bytes:
    size = 70 * 1024
    assert size > MAX_RESPONSE_HEAD
    if kind == "many_headers":
        headers = b"".join(b"x-fill-%d: %b\r\n" % (i, b"v" * 1000) for i in range(size // 1000))
    else:
        headers = b"x-one: " + b"v" * size + b"\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + headers + b"\r\nok"


@pytest.mark.parametrize("kind", ["many_headers", "one_header"])
@pytest.mark.parametrize("writes", [1, 8])
async def test_response_head_over_the_limit_is_502(gateway, kind, writes):
    """A 70 KiB head in one write (usually one read: the bound must hold within a read)
    or in several writes (across reads): 502, and the upstream connection is closed."""
    closed = asyncio.Event()

    async def big(reader, writer):
        await read_request_head(reader)
        data = _big_head(kind)
        step = -(-len(data) // writes)
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()
            if writes > 1:
                await asyncio.sleep(0.01)  # shapes the stream into several reads; no assert on time
        assert await reader.read() == b""
        closed.set()

    async with RawUpstream(big) as up:
        gw = await gateway(_config(up.port, 1))
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("GET", "/id/big")
            assert r.status == 502 and r.json() == {"message": "Bad Gateway"}
            await asyncio.wait_for(closed.wait(), 10)
        finally:
            await c.close()
        t = await _telemetry(gw)
        assert t["closed"] == {"invalid_response": 1}, t


async def test_a_head_just_under_the_limit_is_relayed(gateway):
    """The bound is not off by a lot: a 60 KiB head in one write passes."""
    headers = b"".join(b"x-fill-%d: %b\r\n" % (i, b"v" * 1000) for i in range(60))

    async def ok(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + headers + b"\r\nok")
        await writer.drain()
        await reader.read()

    async with RawUpstream(ok) as up:
        gw = await gateway(_config(up.port, 1))
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("GET", "/id/x")
            assert r.status == 200 and r.body == b"ok" and r.header("x-fill-59") == "v" * 1000
        finally:
            await c.close()


# -- the gateway's own client (JWKS, authorizers) over the same pool ---------------------

async def test_fetch_never_gets_another_requests_response():
    echo = EchoUpstream(lambda n, rid: _response(b"stale-" + rid) if n % 3 == 2 else b"")
    async with RawUpstream(echo) as up:
        pool = TargetPool(Target("http", "127.0.0.1", up.port), PoolConfig(max_connections=2),
                          asyncio.get_running_loop(), upstream="authz")
        try:
            async def one(i: int) -> tuple[str, int, bytes]:
                rid = f"f{i}"
                status, _, body = await fetch(pool, "GET", f"/id/{rid}", timeout=10)
                return rid, status, body

            results = await asyncio.gather(*(one(i) for i in range(60)))
            _assert_all_own(list(results))
            assert pool.closed_by_reason.get("excess_data") == echo.over_sent == 20
            assert pool.in_use == 0
        finally:
            await pool.close()


async def test_fetch_head_over_the_limit_fails():
    async def big(reader, writer):
        await read_request_head(reader)
        writer.write(_big_head("many_headers"))
        await writer.drain()
        await reader.read()

    async with RawUpstream(big) as up:
        pool = TargetPool(Target("http", "127.0.0.1", up.port), PoolConfig(),
                          asyncio.get_running_loop(), upstream="jwks")
        try:
            with pytest.raises(FetchError, match="head too large"):
                await fetch(pool, "GET", "/id/x", timeout=10)
            assert pool.closed_by_reason == {"invalid_response": 1} and pool.in_use == 0
        finally:
            await pool.close()
