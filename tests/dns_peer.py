"""A real DNS server on loopback UDP for the DNS tests: answers A and AAAA queries from
`table` ({(name, "A"|"AAAA"): [(address, ttl), ...]}), NXDOMAIN for other names, and can
stop answering (`silent`) to play a resolver that is down. Counts the queries it got."""

from __future__ import annotations

import asyncio
import socket
import struct

_TYPES = {1: "A", 28: "AAAA"}


class DnsPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.table: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.silent = False
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self) -> DnsPeer:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.silent or len(data) < 12:
            return
        qid = struct.unpack("!H", data[:2])[0]
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]].decode())
            i += data[i] + 1
        qtype = struct.unpack("!H", data[i + 1 : i + 3])[0]
        question = data[12 : i + 5]
        name = ".".join(labels).lower()
        kind = _TYPES.get(qtype, "?")
        self.queries.append((name, kind))
        known = any(n == name for n, _ in self.table)
        answers = self.table.get((name, kind), [])
        out = struct.pack("!HHHHHH", qid, 0x8180 | (0 if known else 3), 1, len(answers), 0, 0) + question
        for address, ttl in answers:
            rdata = socket.inet_pton(socket.AF_INET if kind == "A" else socket.AF_INET6, address)
            out += b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, ttl, len(rdata)) + rdata
        assert self.transport is not None
        self.transport.sendto(out, addr)
