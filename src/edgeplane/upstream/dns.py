"""Hostname targets resolved with aiodns: every address an endpoint, refreshed at its TTL.

Owns `TargetResolver`, one per hostname target of an upstream (a target written with
an IP address, or a Unix socket, is not resolved). It asks for A and AAAA records
(`aiodns.DNSResolver.query_dns`, the upstream's `dns.resolvers` or the system's), and
hands the sorted addresses to the upstream (`cluster.Upstream.set_addresses`) whenever
they change. The next query is due at the answer's TTL, kept within `dns.min_ttl` and
`dns.max_ttl`.

Invariants: a failed refresh keeps the last good answer and is logged once per streak
(its recovery once), then tried again after `min_ttl`. A name that resolves to nothing
at start leaves the target with no endpoints (the upstream answers 503 while it has
none) and a warning; `serve --strict` refuses to start instead (`first()` reports it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiodns

log = logging.getLogger("edgeplane.dns")


class TargetResolver:
    __slots__ = ("host", "cfg", "on_change", "addresses", "failing", "_task", "upstream", "queries")

    def __init__(self, upstream: str, host: str, cfg: Any, on_change: Callable[[str, list[str]], None]) -> None:
        self.upstream = upstream
        self.host = host
        self.cfg = cfg  # config.resilience.DnsConfig
        self.on_change = on_change
        self.addresses: list[str] = []
        self.failing = False
        self.queries = 0
        self._task: asyncio.Task[None] | None = None

    async def _query(self) -> tuple[list[str], float]:
        """(sorted addresses, TTL) of A and AAAA; raises aiodns.error.DNSError when neither answers."""
        found: list[str] = []
        ttls: list[int] = []
        errors: list[Exception] = []
        # A resolver per refresh: c-ares keeps a query cache of its own (with no switch in
        # pycares to turn it off) that would outlive `max_ttl` and keep an empty answer.
        resolver = aiodns.DNSResolver(nameservers=list(self.cfg.resolvers) or None)
        try:
            results = []
            for kind in ("A", "AAAA"):
                try:
                    results.append(await resolver.query_dns(self.host, kind))
                except aiodns.error.DNSError as exc:
                    errors.append(exc)
        finally:
            await resolver.close()
        for result in results:
            for record in result.answer:
                addr = getattr(record.data, "addr", None)
                if addr is not None and record.type in (1, 28):
                    found.append(addr)
                    ttls.append(record.ttl)
        self.queries += 1
        if not found:
            raise errors[0] if errors else aiodns.error.DNSError(1, "no address")
        ttl = min(max(min(ttls), self.cfg.min_ttl), self.cfg.max_ttl)
        return sorted(set(found)), ttl

    async def first(self) -> str | None:
        """The first resolution (at start or reload); then the refresh loop runs. Returns
        why the name did not resolve, or None."""
        why = None
        try:
            addresses, ttl = await asyncio.wait_for(self._query(), 5.0)
            self._apply(addresses)
        except (aiodns.error.DNSError, TimeoutError) as exc:
            why = f"{exc}"
            ttl = self.cfg.min_ttl
            self.failing = True
            log.warning("upstream %s: %s does not resolve (%s): no endpoints for it until it does",
                        self.upstream, self.host, why)
        self._task = asyncio.get_running_loop().create_task(self._refresh(ttl))
        return why

    async def _refresh(self, wait: float) -> None:
        while True:
            await asyncio.sleep(wait)
            try:
                addresses, wait = await asyncio.wait_for(self._query(), 5.0)
            except (aiodns.error.DNSError, TimeoutError) as exc:
                if not self.failing:
                    log.warning("upstream %s: refreshing %s failed (%s); keeping %s", self.upstream, self.host,
                                exc, ", ".join(self.addresses) or "no address")
                    self.failing = True
                wait = self.cfg.min_ttl
                continue
            if self.failing:
                log.info("upstream %s: %s resolves again", self.upstream, self.host)
                self.failing = False
            self._apply(addresses)

    def _apply(self, addresses: list[str]) -> None:
        if addresses != self.addresses:
            log.info("upstream %s: %s resolves to %s", self.upstream, self.host, ", ".join(addresses))
            self.addresses = addresses
            self.on_change(self.host, addresses)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
