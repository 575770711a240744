"""WebSocket proxying through an `http` route (`ws_proxy` + `wsrelay`): the two
handshakes, refusals of broken or fake 101s, non-101 answers keeping HTTP, the relay of
frames end to end with real WebSocket peers, one access-log line per connection, and
1,000 concurrent proxied connections."""

from __future__ import annotations

import asyncio
import json

import pytest
from wsproto.events import CloseConnection

from conftest import base_config
from ws_peers import WsClient, WsUpstream

pytestmark = pytest.mark.timeout(60)


def ws_config(port: int, **extra) -> dict:
    cfg = base_config(routes=[
        {"route": "GET /ws", "integration": {"type": "http", "upstream": "chat"}},
        {"route": "GET /ping", "integration": {"type": "mock"}},
    ], **extra)
    cfg["upstreams"] = {"chat": {"targets": [f"http://127.0.0.1:{port}"]}}
    return cfg


@pytest.fixture
async def ws_upstream():
    made = []

    async def make(mode: str = "echo") -> WsUpstream:
        up = await WsUpstream(mode).start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.stop()


async def test_echo_through_the_gateway_with_subprotocol(gateway, ws_upstream):
    up = await ws_upstream()
    gw = await gateway(ws_config(up.port))
    c = await WsClient.connect(gw.addresses[0], headers={"Sec-WebSocket-Protocol": "chat.v2, chat.v1",
                                                          "Sec-WebSocket-Extensions": "permessage-deflate"})
    assert c.status == 101
    assert c.header("sec-websocket-protocol") == b"chat.v2"   # the upstream's choice, relayed
    assert c.header("set-cookie") == b"sid=1"                  # end-to-end headers pass
    assert c.header("sec-websocket-extensions") is None
    sent = up.requests[-1].lower()
    assert b"sec-websocket-extensions" not in sent             # never offered upstream
    assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent
    c.send_text("hello")
    assert await c.recv() == "hello"
    c.send_bytes(b"\x00\x01binary")
    assert await c.recv() == b"\x00\x01binary"
    c.send_text("frag-", finished=False)
    c.send_text("mented")
    assert await c.recv() == "frag-mented"
    c.close(1000, "done")
    event = await c.recv()
    assert isinstance(event, CloseConnection) and event.code == 1000
    await c.aclose()
    assert up.received == ["hello", b"\x00\x01binary", "frag-mented"]


async def test_non_101_answer_is_relayed_and_the_connection_stays_http(gateway, ws_upstream):
    up = await ws_upstream("plain")
    gw = await gateway(ws_config(up.port))
    c = await WsClient.connect(gw.addresses[0])
    assert c.status == 200 and c.body == b"plain"
    head = await c.http(b"GET /ping HTTP/1.1\r\nHost: gw.test\r\n\r\n")   # same connection, HTTP
    assert head.startswith(b"HTTP/1.1 200")
    await c.aclose()


@pytest.mark.parametrize("mode", ["bad-accept", "extension", "bad-protocol"])
async def test_broken_101_from_upstream_is_a_502(gateway, ws_upstream, mode):
    up = await ws_upstream(mode)
    gw = await gateway(ws_config(up.port))
    c = await WsClient.connect(gw.addresses[0], headers={"Sec-WebSocket-Protocol": "chat.v1"})
    assert c.status == 502 and json.loads(c.body) == {"message": "Bad Gateway"}
    await c.aclose()
    assert gw.stats()["errors"]["502"] == 1


async def test_bad_client_handshakes_are_refused_before_the_upstream(gateway, ws_upstream):
    up = await ws_upstream()
    gw = await gateway(ws_config(up.port))
    c = await WsClient.connect(gw.addresses[0], version="8")
    assert c.status == 426 and c.header("sec-websocket-version") == b"13"
    await c.aclose()
    c = await WsClient.connect(gw.addresses[0], key=b"c2hvcnQ=")  # "short": not 16 bytes
    assert c.status == 400
    await c.aclose()
    assert up.requests == []


async def test_garbage_after_the_101_closes_the_client_with_1011(gateway, ws_upstream):
    up = await ws_upstream("garbage")
    gw = await gateway(ws_config(up.port))
    c = await WsClient.connect(gw.addresses[0])
    assert c.status == 101
    event = await c.recv()
    assert isinstance(event, CloseConnection) and event.code == 1011
    await c.aclose()


async def test_upstream_close_handshake_reaches_the_client_and_is_logged(gateway, ws_upstream, tmp_path):
    up = await ws_upstream("close-after")
    log = tmp_path / "access.log"
    gw = await gateway(ws_config(up.port, access_log={"destination": "file", "path": str(log)}))
    c = await WsClient.connect(gw.addresses[0])
    c.send_text("one")
    assert await c.recv() == "one"
    event = await c.recv()
    assert isinstance(event, CloseConnection) and (event.code, event.reason) == (1000, "bye")
    await c.aclose()
    for _ in range(100):
        if not gw._context.websockets:
            break
        await asyncio.sleep(0.02)
    gw._access_log.flush(wait=2.0)
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["status"] == 101 and line["routeKey"] == "GET /ws"
    ws = line["websocket"]
    assert (ws["messagesIn"], ws["messagesOut"]) == (1, 1)
    assert ws["closedBy"] == "upstream" and ws["closeCodeClient"] == 1000


async def test_stopping_gateway_closes_websockets_with_1001(ws_upstream):
    from edgeplane import Gateway

    up = await ws_upstream()
    gw = Gateway(ws_config(up.port))
    await gw.start()
    c = await WsClient.connect(gw.addresses[0])
    c.send_text("x")
    assert await c.recv() == "x"
    stop = asyncio.ensure_future(gw.stop(drain_timeout=2.0))
    event = await c.recv()
    assert isinstance(event, CloseConnection) and event.code == 1001
    await c.aclose()
    await asyncio.wait_for(stop, 10)


async def test_a_thousand_concurrent_proxied_websockets(gateway, ws_upstream):
    up = await ws_upstream()
    cfg = ws_config(up.port)
    cfg["upstreams"]["chat"]["pool"] = {"max_connections": 2000}
    gw = await gateway(cfg)
    addr = gw.addresses[0]
    clients = await asyncio.gather(*(WsClient.connect(addr) for _ in range(1000)))
    assert {c.status for c in clients} == {101}
    assert len(gw._context.websockets) == 1000 and gw.stats()["websockets_open"] == 1000
    for i, c in enumerate(clients):
        c.send_text(f"m{i}")
    answers = await asyncio.gather(*(c.recv() for c in clients))
    assert answers == [f"m{i}" for i in range(1000)]
    for c in clients:
        c.close()
    await asyncio.gather(*(c.recv() for c in clients))
    await asyncio.gather(*(c.aclose() for c in clients))
    for _ in range(200):
        if not gw._context.websockets:
            break
        await asyncio.sleep(0.02)
    assert not gw._context.websockets
    assert gw.upstream_telemetry()  # the pool is sane afterwards


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_synchronous_detach_keeps_bytes_sent_with_the_upgrade(gateway, ws_upstream, parser):
    """A WebSocket handler that accepts inside dispatch (before the parser has returned)
    still gets the bytes that came in the same read as the upgrade request."""
    up = await ws_upstream()
    gw = await gateway(ws_config(up.port, http={"parser": parser}))
    got = bytearray()

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.extend(data)

    class SyncAccept:
        def handle(self, proto, req):
            proto.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            transport, tail = proto.detach()
            sink = Sink()
            transport.set_protocol(sink)
            if tail:
                sink.data_received(tail)

    gw._context.snapshot.websocket_apis[b"/sync"] = SyncAccept()
    reader, writer = await asyncio.open_connection(*gw.addresses[0])
    writer.write(b"GET /sync HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 b"FRAME-BYTES")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert bytes(got) == b"FRAME-BYTES"
    writer.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"])
async def test_upgrade_request_with_a_body_is_refused(gateway, ws_upstream, framing):
    """llhttp ends an upgrade request at its head: a declared body would reach the
    upstream as the next request on a pooled connection (smuggling). 400, and closed."""
    up = await ws_upstream()
    gw = await gateway(ws_config(up.port))
    reader, writer = await asyncio.open_connection(*gw.addresses[0])
    writer.write(b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 + framing + b"\r\nGET /internal HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 400")
    await asyncio.wait_for(reader.read(), 5)  # the body, then EOF: the connection is closed
    writer.close()
    assert up.requests == []


async def test_upgrade_pipelined_behind_a_request_keeps_its_early_frames(gateway, ws_upstream):
    """A WebSocket handshake queued behind another request: the frames the client sends
    right after it are kept for the relay, not parsed as HTTP."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    up = await ws_upstream()
    gw = await gateway(ws_config(up.port))
    reader, writer = await asyncio.open_connection(*gw.addresses[0])
    ws = Connection(ConnectionType.CLIENT)
    writer.write(b"GET /ping HTTP/1.1\r\nHost: gw.test\r\n\r\n"
                 b"GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 + ws.send(TextMessage(data="early hello")))
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200")
    length = int([ln for ln in first.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
    await reader.readexactly(length)
    second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert second.startswith(b"HTTP/1.1 101")
    for _ in range(100):
        if up.received:
            break
        await asyncio.sleep(0.01)
    assert up.received == ["early hello"]
    writer.close()
