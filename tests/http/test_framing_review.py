"""What a black-box review of the native framers found, kept fixed, through real gateways
on loopback with every request parser (and the pure-Python twins in the second CI run):

- an upgrade request after a head carried from an earlier read, in the same read: the
  bytes after it were taken from the wrong offset, so a request hidden in a body reached
  the upstream as a real one (request smuggling);
- an upstream status 0xx was taken for an interim 1xx, so its body was read as the next
  response (response splitting): now 502;
- HTTP/1.0 with a Transfer-Encoding kept the connection open (RFC 9112 6.1: close after),
  on the client side and for a pooled upstream connection;
- a response with a transfer coding other than chunked was cut short: now 502;
- bad chunked framing in the same read as the response head left the client with an
  empty reply: now 502;
- an unfinished request line whose method can no longer be one of the table waited for
  the head timeout: now 400 at once.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import PARSERS, RawClient, RawUpstream, base_config

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_logged_exceptions")]


class Recorder:
    """A raw upstream that keeps every byte it receives and answers each request head
    (Content-Length bodies, and empty chunked ones, read) with `200 ok`."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.paths: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            self.received += head
            self.paths.append(head.split(b" ", 2)[1])
            lower = head.lower()
            if b"\r\ncontent-length: " in lower:
                n = int(lower.split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0])
                self.received += await reader.readexactly(n)
            elif b"\r\ntransfer-encoding: chunked" in lower:  # (the tests send empty ones)
                self.received += await reader.readuntil(b"0\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()


@pytest.fixture(params=PARSERS)
def parser(request):
    return request.param


def _config(port: int, parser: str, **extra) -> dict:
    routes = [{"route": "$default", "integration": {"type": "http", "upstream": "demo", "timeout": "2s"}}]
    return base_config(port, routes=routes, http={"parser": parser},
                       limits={"head_timeout": "3s", "keepalive_timeout": "5s"}, **extra)


async def test_upgrade_after_a_carried_head_takes_the_right_bytes(gateway, parser):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(_config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(b"GET /first HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 18)  # unfinished
            await asyncio.sleep(0.2)
            hidden = b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n"
            await c.send(b"\r\n\r\nGET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                         + b"POST /visible HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden)
            statuses = [(await c.read_response()).status for _ in range(3)]
        finally:
            await c.close()
    assert statuses[0] == 200 and statuses[2] == 200
    assert rec.paths == [b"/first", b"/ws", b"/visible"] or rec.paths == [b"/first", b"/visible"], rec.paths
    assert b"/hidden" not in rec.paths  # it stayed the body it was sent as
    assert rec.received.endswith(hidden)


async def _through(gateway, parser: str, response: bytes, then_close: bool = True):
    """One client request through an upstream that sends `response` (then closes):
    the client's status and body, and the upstream's connection count after a second
    request on a new client connection."""
    seen = []

    async def upstream(reader, writer):
        seen.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        if then_close:
            await asyncio.sleep(0.05)
            writer.close()
            return
        while True:  # a second request on this connection gets a plain answer
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
            await writer.drain()

    async with RawUpstream(upstream) as up:
        gw = await gateway(_config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            r = await c.request("GET", "/x")
        finally:
            await c.close()
        c = await RawClient.connect(gw.addresses[0])
        try:
            r2 = await c.request("GET", "/y")
        finally:
            await c.close()
        return r, r2, len(seen)


@pytest.mark.parametrize("status", [b"099", b"000"])
async def test_a_0xx_status_is_a_bad_gateway_not_an_interim_answer(gateway, status):
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
    r, _, _ = await _through(gateway, "native", b"HTTP/1.1 " + status + b" X\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
    assert r.status == 502 and b"EVIL" not in r.body


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"identity"])
async def test_a_transfer_coding_other_than_chunked_is_a_bad_gateway(gateway, coding):
    r, _, _ = await _through(gateway, "native", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding
                             + b"\r\n\r\nnot-really-" + coding)
    assert r.status == 502


@pytest.mark.parametrize("bad", [b"zz\r\n", b"2\r\nabX\r\n", b"0\r\nContent-Length: 1\r\n\r\n"])
async def test_bad_chunks_in_the_head_s_read_get_a_502_not_an_empty_reply(gateway, bad):
    r, _, _ = await _through(gateway, "native", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + bad)
    assert r.status == 502


async def test_an_http10_chunked_response_is_not_pooled(gateway):
    r, r2, connections = await _through(
        gateway, "native", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n", then_close=False)
    assert r.status == 200 and r.body == b"abc"
    assert r2.status == 200 and connections == 2  # a new upstream connection for the second


async def test_an_http10_chunked_request_closes_the_connection(gateway, parser):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(_config(up.port, parser))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(b"POST /e HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                         b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n")
            r = await c.read_response()
            assert r.status == 200
            with pytest.raises(ConnectionError):
                await c.read_response(timeout=3)
        finally:
            await c.close()
    assert rec.paths == [b"/e"]  # the request after it was not served


@pytest.mark.parametrize("start", [b"XYZ", b"GETX", b"G E", b"\x16\x03\x01"])
async def test_a_request_line_that_cannot_have_a_method_is_refused_at_once(gateway, start):
    rec = Recorder()
    async with RawUpstream(rec) as up:
        gw = await gateway(_config(up.port, "native"))
        c = await RawClient.connect(gw.addresses[0])
        try:
            await c.send(start)
            r = await c.read_response(timeout=2)  # the head timeout is 3 s: a 408 would come later
        finally:
            await c.close()
    assert r.status == 400
