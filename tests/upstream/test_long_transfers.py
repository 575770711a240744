"""Transfers that take longer than the integration timeout, both ways, through a real
gateway: an upload to an upstream that reads slowly, and a download to a client that
reads slowly. A body that keeps moving never trips a deadline; the client is not blamed
for the pauses the upstream causes (no 408); a real stall still ends the exchange."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import base_config
from edgeplane.runtime.demo_upstream import DemoUpstream

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
SIZE = 16 * MIB  # about 2.5 s at the ~6 MiB/s each slow side reads: past the 1 s timeouts


class SlowReader:
    """An upstream that reads a request body 64 KiB at a time with a 10 ms pause (or not
    at all once `stall` is set), then answers how many bytes it got."""

    def __init__(self) -> None:
        self.port = 0
        self.received = 0
        self.stall = False

    async def __aenter__(self) -> SlowReader:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while self.received < length:
                if self.stall:
                    await asyncio.sleep(3600)
                self.received += len(await reader.readexactly(min(64 * 1024, length - self.received)))
                await asyncio.sleep(0.01)
            body = json.dumps({"received": self.received}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def config(port: int) -> dict:
    cfg = base_config(routes=[{"route": "ANY /up/{proxy+}", "integration": {
        "type": "http", "upstream": "app", "path": "/{proxy}", "timeout": "1s", "idle_timeout": "1s"}}])
    cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{port}"]}}
    cfg["limits"] = {"max_body_bytes": 4 * SIZE}
    return cfg


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def test_an_upload_to_a_slow_upstream_outlasts_the_timeouts(gateway):
    async with SlowReader() as upstream:
        gw = await gateway(config(upstream.port))
        reader, writer = await asyncio.open_connection(*gw.addresses[0])
        writer.write(b"POST /up/load HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % SIZE)
        chunk = b"x" * (256 * 1024)
        for _ in range(SIZE // len(chunk)):  # as fast as the gateway lets it
            writer.write(chunk)
            await writer.drain()
        status, body = await response(reader)
        writer.close()
        assert (status, json.loads(body)) == (200, {"received": SIZE})


async def test_an_upload_whose_upstream_stops_reading_ends_in_504_not_408(gateway):
    async with SlowReader() as upstream:
        upstream.stall = True
        gw = await gateway(config(upstream.port))
        reader, writer = await asyncio.open_connection(*gw.addresses[0])
        writer.write(b"POST /up/load HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % SIZE)

        async def send() -> None:
            try:
                for _ in range(SIZE // (256 * 1024)):
                    writer.write(b"x" * (256 * 1024))
                    await writer.drain()
            except ConnectionError:
                pass

        sender = asyncio.ensure_future(send())
        status, body = await response(reader)
        sender.cancel()
        writer.close()
        assert (status, body) == (504, b'{"message":"Endpoint request timed out"}')


async def test_a_download_to_a_slow_client_outlasts_the_timeouts(gateway):
    async with DemoUpstream() as upstream:
        gw = await gateway(config(upstream.port))
        reader, writer = await asyncio.open_connection(*gw.addresses[0], limit=64 * 1024)
        writer.write(b"GET /up/bytes/%d HTTP/1.1\r\nhost: gw\r\n\r\n" % SIZE)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = 0
        while got < SIZE:  # 64 KiB at a time, 10 ms apart
            data = await asyncio.wait_for(reader.read(64 * 1024), 10)
            assert data, f"closed after {got} bytes"
            got += len(data)
            await asyncio.sleep(0.01)
        writer.close()
        assert got == SIZE
