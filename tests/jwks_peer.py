"""A JWKS endpoint for tests: a real server on loopback answering every GET with an
empty key set (which a JWT authorizer counts as a failed fetch), counting the fetches."""

from __future__ import annotations

import asyncio


class EmptyJwks:
    def __init__(self) -> None:
        self.fetches = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> EmptyJwks:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/jwks.json"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.fetches += 1
                body = b'{"keys": []}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
