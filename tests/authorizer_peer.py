"""A custom (HTTP) authorizer for tests: a real server on loopback that reads each
payload the gateway POSTs, asks `decide(event)` for the answer, and keeps what it saw.

`decide` returns the answer: a dict (sent as JSON, e.g. `{"isAuthorized": True}`) or
bytes (sent as they are, for answers JSON writers cannot make). `seen` holds, per call,
the request's headers (lower-case bytes names) and the decoded event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson


class AuthorizerPeer:
    def __init__(self, decide: Callable[[dict], dict | bytes]) -> None:
        self.decide = decide
        self.seen: list[tuple[dict[bytes, bytes], dict]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> AuthorizerPeer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/authorize"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def __aenter__(self) -> AuthorizerPeer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in head.split(b"\r\n")[1:]
                                                     if b": " in line)}
                event = orjson.loads(await reader.readexactly(int(headers[b"content-length"])))
                self.seen.append((headers, event))
                answer = self.decide(event)
                body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
