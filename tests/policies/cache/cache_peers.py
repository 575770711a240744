"""A scripted upstream for the cache tests: per path, the status, headers and body it
answers with, an optional delay, and a count of the requests it received."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    end: str = "length"  # "length" (Content-Length), "close" (close-delimited, FIN), "reset" (close-delimited, RST)


class ScriptedUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.default = Script(200, {"content-type": "text/plain"}, b"")
        self.requests: list[tuple[str, dict[str, str]]] = []  # (target, headers) received
        self.serial = 0  # the body of an unscripted path: "<path> #<n>"
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def count(self, target: str) -> int:
        return sum(1 for t, _ in self.requests if t == target)

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):  # its handlers end on EOF, not by cancellation
            writer.transport.abort()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if int(headers.get("content-length", "0")):
                    await reader.readexactly(int(headers["content-length"]))
                self.requests.append((target, headers))
                path = target.split("?", 1)[0]
                script = self.scripts.get(path)
                if script is None:
                    self.serial += 1
                    script = Script(200, {"content-type": "text/plain"}, f"{target} #{self.serial}".encode())
                if script.delay:
                    await asyncio.sleep(script.delay)
                if script.status == 0:  # scripted to drop the connection
                    writer.transport.abort()
                    return
                extra = "".join(f"{k}: {v}\r\n" for k, v in script.headers.items())
                body = b"" if method == "HEAD" else script.body
                if script.end != "length":  # the body ends with the connection
                    writer.write(f"HTTP/1.1 {script.status} X\r\n{extra}\r\n".encode("latin-1") + body)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if script.end == "reset":  # SO_LINGER 0: the close is a RST, not a FIN
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                    return
                writer.write(f"HTTP/1.1 {script.status} X\r\n{extra}content-length: {len(script.body)}\r\n\r\n"
                             .encode("latin-1") + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


def cached_config(port: int, cache: dict | None = None, route: str = "ANY /c/{proxy+}", **route_extra) -> dict:
    """One cached route in front of the scripted upstream on `port` (plus `route_extra`)."""
    from conftest import base_config

    cfg = base_config(routes=[{"route": route, "integration": {"type": "http", "upstream": "app"},
                               "cache": cache if cache is not None else {"ttl": "60s"}, **route_extra}])
    cfg["upstreams"] = {"app": {"targets": [f"http://127.0.0.1:{port}"]}}
    return cfg


async def get(addr, path: str, headers: dict | None = None, method: str = "GET"):
    from conftest import RawClient

    return await RawClient.once(addr, method, path, headers)
