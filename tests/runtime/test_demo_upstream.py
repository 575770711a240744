"""Tests for edgeplane.demo_upstream over real loopback sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections import deque

import httptools
import orjson
import pytest

from conftest import REPO
from edgeplane.runtime.demo_upstream import DemoUpstream, main


class Resp:
    def __init__(self) -> None:
        self.status = 0
        self.version = ""
        self.header_list: list[tuple[str, str]] = []
        self.body = b""
        self.chunks = 0

    @property
    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self.header_list}

    def json(self):
        return orjson.loads(self.body)


class Client:
    """Raw HTTP/1.1 client: write bytes, parse responses in order with httptools."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = httptools.HttpResponseParser(self)
        self.done: deque[Resp] = deque()
        self.cur = Resp()

    @classmethod
    async def connect(cls, up: DemoUpstream) -> Client:
        r, w = await asyncio.open_connection(up.host, up.port)
        return cls(r, w)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.cur = Resp()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.header_list.append((name.decode().lower(), value.decode()))

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()
        self.cur.version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_chunk_complete(self) -> None:
        # httptools also reports the terminating zero-size chunk; count data chunks only.
        self.cur.chunks += 1

    def on_message_complete(self) -> None:
        if self.cur.chunks:
            self.cur.chunks -= 1
        self.done.append(self.cur)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> Resp:
        while not self.done:
            data = await asyncio.wait_for(self.reader.read(1 << 20), 2)
            if not data:
                raise EOFError("connection closed before a full response")
            self.parser.feed_data(data)
        return self.done.popleft()

    async def request(self, raw: bytes) -> Resp:
        self.send(raw)
        return await self.response()

    async def at_eof(self) -> bool:
        try:
            rest = await asyncio.wait_for(self.reader.read(), 2)
        except ConnectionResetError:
            return True
        assert rest == b"", rest
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@pytest.fixture
async def up():
    async with DemoUpstream() as server:
        yield server


@pytest.fixture
async def client(up):
    c = await Client.connect(up)
    yield c
    await c.close()


def get(path: str, extra: str = "", version: str = "1.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nhost: t\r\n{extra}\r\n".encode()


async def test_port_zero_binds_real_port(up):
    assert up.port > 0
    assert up.url == f"http://127.0.0.1:{up.port}"


async def test_echo_get_fields(client):
    r = await client.request(
        b"GET /some/path%20x?a=1&b=two HTTP/1.1\r\nHost: t\r\nX-Multi: one\r\nX-Multi: two\r\nX-Case: V\r\n\r\n"
    )
    assert r.status == 200
    h = r.headers
    assert h["content-type"] == "application/json"
    assert h["server"] == "edgeplane-demo"
    assert re.match(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", h["date"])
    assert int(h["content-length"]) == len(r.body)
    j = r.json()
    assert j["method"] == "GET"
    assert j["path"] == "/some/path%20x"
    assert j["query"] == "a=1&b=two"
    assert j["headers"]["x-multi"] == "one, two"
    assert j["headers"]["x-case"] == "V"
    assert j["headers"]["host"] == "t"
    assert j["body"] == "" and j["body_length"] == 0


async def test_echo_no_query_is_empty(client):
    j = (await client.request(get("/x"))).json()
    assert j["path"] == "/x" and j["query"] == ""


async def test_echo_content_length_body(client):
    body = "héllo wörld".encode()
    r = await client.request(
        b"POST /post HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    j = r.json()
    assert j["method"] == "POST"
    assert j["body"] == "héllo wörld"
    assert j["body_length"] == len(body)


async def test_echo_chunked_body_split_across_writes(client):
    client.send(b"PUT /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await client.writer.drain()
    client.send(b"6\r\n world\r\n0\r\n\r\n")
    j = (await client.response()).json()
    assert j["method"] == "PUT"
    assert j["body"] == "hello world"
    assert j["body_length"] == 11
    assert j["headers"]["transfer-encoding"] == "chunked"


async def test_echo_invalid_utf8_body_replaced(client):
    r = await client.request(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n\xff\xfe")
    # "/" is the tiny benchmark path
    assert r.body == b"ok"
    j = (await client.request(b"POST /e HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n\xff\xfe")).json()
    assert j["body"] == "\ufffd\ufffd" and j["body_length"] == 2


async def test_two_byte_paths(client):
    for path in ("/2b", "/"):
        r = await client.request(get(path))
        assert r.status == 200
        assert r.body == b"ok"
        assert r.headers["content-length"] == "2"


async def test_status_codes(client):
    for code in (201, 404, 418, 503, 599):
        r = await client.request(get(f"/status/{code}"))
        assert r.status == code
        assert r.json() == {"status": code}
    r = await client.request(get("/status/204"))
    assert r.status == 204 and r.body == b""
    assert "content-length" not in r.headers
    r = await client.request(get("/status/304"))
    assert r.status == 304 and r.body == b""
    # still usable afterwards
    assert (await client.request(get("/2b"))).body == b"ok"


@pytest.mark.parametrize("path", ["/status/600", "/status/99", "/status/abc", "/status/"])
async def test_status_invalid(client, path):
    r = await client.request(get(path))
    assert r.status == 400


async def test_delay(client):
    t0 = time.monotonic()
    r = await client.request(get("/delay/50?x=1"))
    elapsed = time.monotonic() - t0
    assert r.status == 200
    assert elapsed >= 0.045
    j = r.json()
    assert j["path"] == "/delay/50" and j["query"] == "x=1"


async def test_bytes(client):
    for n in (0, 1, 10, 16384, 65536, 100_000, 1_000_003):
        r = await client.request(get(f"/bytes/{n}"))
        assert r.status == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-length"] == str(n)
        assert len(r.body) == n
        assert r.body == b"x" * n


async def test_bytes_over_cap(client):
    r = await client.request(get(f"/bytes/{64 * 1024 * 1024 + 1}"))
    assert r.status == 400
    r = await client.request(get("/bytes/-1"))
    assert r.status == 400


async def test_stream(client):
    r = await client.request(get("/stream/7"))
    assert r.status == 200
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    lines = r.body.decode().splitlines()
    assert [orjson.loads(x) for x in lines] == [{"chunk": i} for i in range(7)]
    assert r.chunks == 7  # data chunks, not counting the terminating 0-chunk
    r = await client.request(get("/stream/0"))
    assert r.body == b""
    r = await client.request(get("/stream/10001"))
    assert r.status == 400


async def test_stream_separate_chunks_on_wire(up):
    r, w = await asyncio.open_connection(up.host, up.port)
    w.write(get("/stream/3", "connection: close\r\n"))
    raw = await asyncio.wait_for(r.read(), 2)
    w.close()
    body = raw.split(b"\r\n\r\n", 1)[1]
    expected = b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in (b'{"chunk": %d}\n' % i for i in range(3)))
    assert body == expected + b"0\r\n\r\n"


async def test_head_has_headers_no_body(up):
    r, w = await asyncio.open_connection(up.host, up.port)
    w.write(get("/bytes/1000", method="HEAD"))
    w.write(get("/echo", "connection: close\r\n", method="HEAD"))
    raw = await asyncio.wait_for(r.read(), 2)
    w.close()
    first, second = raw.split(b"\r\n\r\n")[:2]
    assert first.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000" in first
    assert second.startswith(b"HTTP/1.1 200")
    assert b"content-type: application/json" in second
    assert b"connection: close" in second
    assert raw.endswith(b"\r\n\r\n") and raw.count(b"HTTP/1.1") == 2


async def test_keep_alive_two_requests(up, client):
    r1 = await client.request(get("/a"))
    r2 = await client.request(get("/b"))
    assert r1.json()["path"] == "/a" and r2.json()["path"] == "/b"
    assert "connection" not in r1.headers
    assert up.connection_count == 1


async def test_http10_closes(client):
    r = await client.request(b"GET /x HTTP/1.0\r\n\r\n")
    assert r.status == 200
    assert r.headers["connection"] == "close"
    assert await client.at_eof()


async def test_http10_keep_alive(client):
    r = await client.request(b"GET /x HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    assert r.headers["connection"] == "keep-alive"
    r = await client.request(b"GET /2b HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    assert r.body == b"ok"


async def test_connection_close_request(client):
    r = await client.request(get("/x", "connection: close\r\n"))
    assert r.headers["connection"] == "close"
    assert await client.at_eof()


async def test_close_endpoint(client):
    r = await client.request(get("/close"))
    assert r.status == 200
    assert r.headers["connection"] == "close"
    assert await client.at_eof()


async def test_pipelining_order(client):
    client.send(get("/delay/50") + get("/status/201") + get("/bytes/70000") + get("/stream/2") + get("/2b"))
    r1 = await client.response()
    r2 = await client.response()
    r3 = await client.response()
    r4 = await client.response()
    r5 = await client.response()
    assert r1.status == 200 and r1.json()["path"] == "/delay/50"
    assert r2.status == 201
    assert len(r3.body) == 70000
    assert r4.chunks == 2
    assert r5.body == b"ok"


async def test_pipelined_after_close_ignored(client):
    client.send(get("/a", "connection: close\r\n") + get("/b"))
    r = await client.response()
    assert r.json()["path"] == "/a"
    assert await client.at_eof()
    assert not client.done


async def test_expect_100_continue(client):
    client.send(b"POST /up HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
    interim = await client.response()
    assert interim.status == 100
    client.send(b"hello")
    r = await client.response()
    assert r.status == 200
    assert r.json()["body"] == "hello"


async def test_malformed_request_400_and_close(client):
    r = await client.request(b"THIS IS NOT HTTP\r\n\r\n")
    assert r.status == 400
    assert r.headers["connection"] == "close"
    assert await client.at_eof()


async def test_malformed_after_good_request(client):
    client.send(get("/delay/20") + b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
    r1 = await client.response()
    r2 = await client.response()
    assert r1.status == 200 and r2.status == 400
    assert await client.at_eof()


async def test_flow_control_bounds_buffer(up):
    r, w = await asyncio.open_connection(up.host, up.port, limit=1 << 16)
    w.write(get("/bytes/67108864"))
    # let the server fill the socket buffers while the client reads nothing
    await asyncio.sleep(0.1)
    (proto,) = up._conns
    assert proto._paused
    assert proto._transport.get_write_buffer_size() < 1 << 20
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    assert b"content-length: 67108864" in head
    left = 64 * 1024 * 1024
    while left:
        chunk = await asyncio.wait_for(r.read(min(left, 1 << 20)), 2)
        assert chunk
        left -= len(chunk)
    w.write(get("/2b"))
    assert (await asyncio.wait_for(r.readuntil(b"ok"), 2)).startswith(b"HTTP/1.1 200")
    w.close()


async def test_stop_closes_connections():
    up = DemoUpstream()
    await up.start()
    c1 = await Client.connect(up)
    c2 = await Client.connect(up)
    assert (await c1.request(get("/2b"))).body == b"ok"
    c2.send(get("/delay/10000"))
    await c2.writer.drain()
    await up.stop()
    assert up.connection_count == 0
    assert await c1.at_eof()
    assert await c2.at_eof()
    with pytest.raises(OSError):
        await asyncio.open_connection(up.host, up.port)
    await c1.close()
    await c2.close()
    # stop() is idempotent
    await up.stop()


async def test_no_timer_left_after_stop():
    up = DemoUpstream()
    await up.start()
    c = await Client.connect(up)
    c.send(get("/delay/5000"))
    await c.writer.drain()
    # wait until the server has parsed the request
    for _ in range(100):
        if up._conns and next(iter(up._conns))._queue:
            break
        await asyncio.sleep(0.005)
    (proto,) = up._conns
    handle = proto._queue[0].handle
    assert handle is not None
    await up.stop()
    assert handle.cancelled()
    await c.close()


def test_main_subprocess():
    async def run() -> None:
        env = dict(os.environ)
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeplane.runtime.demo_upstream", "--port", "0",
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            m = re.fullmatch(r"demo upstream listening on http://127\.0\.0\.1:(\d+)\n", line)
            assert m, line
            port = int(m.group(1))
            assert port > 0
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(get("/2b", "connection: close\r\n"))
            raw = await asyncio.wait_for(r.read(), 2)
            assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\nok")
            w.close()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 5) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(run())


def test_main_sigint_exits_zero():
    async def run() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c",
            "import sys; from edgeplane.runtime.demo_upstream import main; sys.exit(main(['--port', '0']))",
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            assert line.startswith("demo upstream listening on http://127.0.0.1:")
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 5) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(run())


def test_main_bad_args():
    with pytest.raises(SystemExit) as ei:
        main(["--port", "notanumber"])
    assert ei.value.code == 2


async def test_upgrade_request_echoed_then_closed(client):
    r = await client.request(get("/ws", "connection: Upgrade\r\nupgrade: websocket\r\n"))
    assert r.status == 200
    assert r.headers["connection"] == "close"
    assert r.json()["headers"]["upgrade"] == "websocket"
    assert await client.at_eof()
