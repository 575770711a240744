"""Shared test harness: real loopback sockets, real upstreams, raw-socket clients.

- `upstream`: the bundled demo upstream on 127.0.0.1:0.
- `gateway`: a factory `await gateway(config_dict)` -> started `Gateway` (stopped at teardown).
- `base_config(upstream_port, routes=...)`: a minimal config dict.
- `redis_server`: a real redis-server (tests/redis_server.py) for the cluster-mode tests.
- `RawClient`: send exact bytes, read responses parsed with httptools.
- `RawUpstream`: a misbehaving upstream driven by a test-supplied coroutine.
- `REPO`: the repository root.

Test modules live in folders that mirror `src/edgeplane` (tests/http, tests/policies/jwt,
...); helper modules (this one, `wsutil`, `ws_peers`, `redis_server`, `shm_workers`) stay
here and are imported by name (`pythonpath = ["tests"]`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import orjson
import pytest

from edgeplane import Gateway
from edgeplane.runtime.demo_upstream import DemoUpstream

PARSERS = ["native", "httptools", "h11"]
REPO = Path(__file__).resolve().parents[1]  # the repository root (tests live in subfolders)


def base_config(upstream_port: int | None = None, routes: list | None = None, **extra) -> dict:
    cfg: dict = {
        "listen": ["127.0.0.1:0"],
        "admin": {"listen": "127.0.0.1:0", "insecure": True},  # loopback, anonymous on purpose
        "access_log": {"destination": "off"},
        "upstreams": {},
        "routes": [],
    }
    if upstream_port is not None:
        cfg["upstreams"]["demo"] = {"targets": [f"http://127.0.0.1:{upstream_port}"]}
    if routes is None and upstream_port is not None:
        routes = [
            {"route": "GET /ping", "integration": {"type": "mock", "status": 200, "body": {"ok": True}}},
            {"route": "ANY /files/{proxy+}",
             "integration": {"type": "http", "upstream": "demo", "path": "/v2/{proxy}"}},
            {"route": "GET /users/{id}", "integration": {"type": "http", "upstream": "demo"}},
            {"route": "$default", "integration": {"type": "http", "upstream": "demo"}},
        ]
    cfg["routes"] = routes or []
    cfg.update(extra)
    return cfg


@pytest.fixture
def no_logged_exceptions(caplog):
    """No exception may escape into asyncio's handler (or be logged) while serving.
    Used by the bad-input test modules (`pytest.mark.usefixtures`)."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    errors = [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port (skips, saying why, if not installed)."""
    from redis_server import RedisServer

    server = RedisServer(str(tmp_path)).start()
    yield server
    server.kill()


@pytest.fixture
async def upstream():
    async with DemoUpstream() as up:
        yield up


@pytest.fixture
async def gateway():
    started: list[Gateway] = []

    async def factory(config: dict) -> Gateway:
        gw = Gateway(config)
        await gw.start()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.stop(drain_timeout=1.0)


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    version: str = "1.1"
    keep_alive: bool = True
    chunked: bool = False

    def header(self, name: str) -> str | None:
        name_b = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == name_b:
                return v.decode("latin-1")
        return None

    def header_all(self, name: str) -> list[str]:
        name_b = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == name_b]

    def json(self):
        return orjson.loads(self.body)


class _ResponseReader:
    def __init__(self, head_only: bool = False):
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.done = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.status = 0
        self.chunked = False
        self.keep_alive = True

    def on_header(self, name, value):
        if self.done:
            return  # bytes of the next response: the caller re-reads them
        self.headers.append((name, value))
        if name.lower() == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self):
        if self.done:
            return
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.status < 200:
            self.headers = []  # an interim response: the final one follows
        elif self.head_only:
            self.done = True

    def on_body(self, body):
        if not self.done:
            self.body += body

    def on_message_complete(self):
        if self.status >= 200:
            self.done = True


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> RawClient:
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        return cls(reader, writer)

    @classmethod
    async def once(cls, addr: tuple[str, int], method: str, path: str, headers: dict | None = None,
                   body: bytes = b"", host: str = "gw.test") -> Response:
        """One request on a new connection, closed after the answer."""
        c = await cls.connect(addr)
        try:
            return await c.request(method, path, headers, body, host)
        finally:
            await c.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, path: str, headers: dict | None = None,
                      body: bytes = b"", host: str = "gw.test") -> Response:
        await self.send(build_request(method, path, headers, body, host))
        return await self.read_response(head_only=method == "HEAD")

    async def read_response(self, head_only: bool = False, timeout: float = 10.0) -> Response:
        rr = _ResponseReader(head_only)
        seen = bytearray()  # this response's bytes so far, to find its end exactly
        while True:
            if self.buffer:
                data = bytes(self.buffer)
                self.buffer.clear()
            else:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    raise ConnectionError("connection closed before a complete response")
            try:
                rr.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass
            if rr.done:
                used = _boundary(head_only, bytes(seen), data)
                self.buffer += data[used:]
                return Response(rr.status, rr.headers, bytes(rr.body),
                                keep_alive=rr.keep_alive, chunked=rr.chunked)
            seen += data

    async def read_raw(self, timeout: float = 10.0) -> bytes:
        """Everything until the peer closes."""
        data = bytes(self.buffer)
        self.buffer.clear()
        while True:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                return data
            data += chunk

    async def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (EOF) without sending more bytes."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _boundary(head_only: bool, before: bytes, data: bytes) -> int:
    """How many bytes of `data` complete the response that started with `before`."""
    probe = _ResponseReader(head_only)
    if before:
        probe.parser.feed_data(before)
    for i in range(len(data)):
        try:
            probe.parser.feed_data(data[i : i + 1])
        except httptools.HttpParserUpgrade:
            return i + 1
        if probe.done:
            return i + 1
    return len(data)


def build_request(method: str, path: str, headers: dict | None = None, body: bytes = b"",
                  host: str = "gw.test") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    headers = dict(headers or {})
    if body and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture
async def client_factory():
    clients: list[RawClient] = []

    async def factory(addr: tuple[str, int]) -> RawClient:
        c = await RawClient.connect(addr)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        await c.close()


class RawUpstream:
    """A test upstream whose behaviour is a coroutine `handler(reader, writer)`."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()

    async def _handle(self, reader, writer):
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.sleep(0)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")
