"""Hostname targets through aiodns, against a real DNS server on loopback
(`tests/dns_peer.py`) and real upstreams on two loopback addresses: every address is an
endpoint, answers are refreshed at their TTL, a failed refresh keeps the last answer, a
name that does not resolve yet answers 503 until it does, and `strict` refuses to start."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from conftest import RawClient, base_config
from dns_peer import DnsPeer
from edgeplane import Gateway

pytestmark = pytest.mark.timeout(60)


class Echo:
    """An upstream on `host:port` answering its own address and the Host it was sent."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.host, self.port, self.requests = host, port, 0

    async def __aenter__(self) -> Echo:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                host = next(line[5:].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
                body = json.dumps({"address": self.host, "host": host.decode()}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def config(port: int, dns: DnsPeer, name: str = "svc.test") -> dict:
    cfg = base_config(routes=[{"route": "GET /a", "integration": {"type": "http", "upstream": "app"}}])
    cfg["upstreams"] = {"app": {"targets": [f"http://{name}:{port}"],
                                "dns": {"resolvers": [dns.address], "min_ttl": "100ms", "max_ttl": "1s"}}}
    return cfg


async def served_by(addr, n: int) -> list[str | int]:
    out: list[str | int] = []
    for _ in range(n):
        r = await RawClient.once(addr, "GET", "/a")
        out.append(json.loads(r.body)["address"] if r.status == 200 else r.status)
    return out


async def test_every_address_is_an_endpoint_and_answers_follow_their_ttl(gateway, caplog):
    dns = await DnsPeer().start()
    try:
        async with Echo("127.0.0.1") as one, Echo("127.0.0.2", one.port) as two:
            dns.table[("svc.test", "A")] = [("127.0.0.1", 1), ("127.0.0.2", 1)]
            gw = await gateway(config(one.port, dns))
            got = await served_by(gw.addresses[0], 10)
            assert sorted(set(got)) == ["127.0.0.1", "127.0.0.2"] and got.count("127.0.0.1") == 5
            assert (one.requests, two.requests) == (5, 5)
            r = await RawClient.once(gw.addresses[0], "GET", "/a")
            assert json.loads(r.body)["host"] == f"svc.test:{one.port}"  # Host: the name, not the address
            names = [t["target"] for t in (await upstreams(gw))["targets"]]
            assert names == [f"http://svc.test:{one.port} (127.0.0.1)", f"http://svc.test:{one.port} (127.0.0.2)"]
            # the answer changes: within its TTL (1 s) only the new address is used
            dns.table[("svc.test", "A")] = [("127.0.0.2", 1)]
            for _ in range(40):
                if set(await served_by(gw.addresses[0], 4)) == {"127.0.0.2"}:
                    break
                await asyncio.sleep(0.1)
            assert set(await served_by(gw.addresses[0], 6)) == {"127.0.0.2"}
            # the resolver goes silent: the last answer stays, and that is logged once
            dns.silent = True
            with caplog.at_level(logging.WARNING, logger="edgeplane.dns"):
                await asyncio.sleep(6.5)  # a query times out after 5 s
                assert set(await served_by(gw.addresses[0], 4)) == {"127.0.0.2"}
            assert any("refreshing svc.test failed" in r.getMessage() and "keeping 127.0.0.2" in r.getMessage()
                       for r in caplog.records)
    finally:
        dns.close()


async def upstreams(gw) -> dict:
    r = await RawClient.once(gw.admin_address, "GET", "/upstreams")
    return {u["name"]: u for u in json.loads(r.body)["upstreams"]}["app"]


async def test_a_name_that_does_not_resolve_yet_is_503_until_it_does(gateway):
    dns = await DnsPeer().start()
    try:
        async with Echo("127.0.0.1") as one:
            gw = await gateway(config(one.port, dns, "later.test"))
            r = await RawClient.once(gw.addresses[0], "GET", "/a")
            assert (r.status, r.body) == (503, b'{"message":"Service Unavailable"}')
            dns.table[("later.test", "A")] = [("127.0.0.1", 1)]
            for _ in range(40):
                if await served_by(gw.addresses[0], 1) == ["127.0.0.1"]:
                    break
                await asyncio.sleep(0.1)
            assert await served_by(gw.addresses[0], 2) == ["127.0.0.1", "127.0.0.1"]
        with pytest.raises(RuntimeError, match="--strict: upstream names do not resolve: nowhere.test: "):
            await Gateway(config(one.port, dns, "nowhere.test"), strict=True).start()
    finally:
        dns.close()


async def test_an_aaaa_only_name_reaches_its_ipv6_endpoint(gateway):
    dns = await DnsPeer().start()
    try:
        async with Echo("::1") as six:
            dns.table[("six.test", "AAAA")] = [("::1", 1)]
            gw = await gateway(config(six.port, dns, "six.test"))
            assert await served_by(gw.addresses[0], 2) == ["::1", "::1"]
            assert (await upstreams(gw))["targets"][0]["target"] == f"http://six.test:{six.port} (::1)"
    finally:
        dns.close()
