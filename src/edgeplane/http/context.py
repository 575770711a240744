"""Per-worker shared state that every connection reads: `ServerContext`.

Owns the current snapshot reference (swapped whole on reload), the limits, the sets of
open client connections and WebSocket connections (for draining), counters, the cached Date header, the access log
and the request-id generator. One `ServerContext` per listener group in a worker process.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from edgeplane.http.responses import DateHeader

if TYPE_CHECKING:
    from edgeplane.config.model import Limits
    from edgeplane.runtime.accesslog import AccessLog


class Stats:
    """Plain counters; read by the admin API. No locks: one event loop per process."""

    __slots__ = ("connections_total", "requests_total", "errors")

    def __init__(self) -> None:
        self.connections_total = 0
        self.requests_total = 0
        self.errors: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections_total": self.connections_total,
            "requests_total": self.requests_total,
            "errors": dict(sorted(self.errors.items())),
        }


class ServerContext:
    __slots__ = (
        "loop", "snapshot", "limits", "parser_kind", "connections", "stats", "date",
        "access_log", "draining", "rid_prefix", "rid_counter", "name", "websockets",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Any,
        limits: Limits,
        parser_kind: str,
        access_log: AccessLog,
        date: DateHeader,
        name: str = "http",
    ) -> None:
        self.loop = loop
        self.snapshot = snapshot
        self.limits = limits
        self.parser_kind = parser_kind
        self.connections: set[Any] = set()
        # Open WebSocket connections (taken over from `connections` after a 101):
        # anything with `.close(code, reason)`, closed with 1001 when the gateway stops.
        self.websockets: set[Any] = set()
        self.stats = Stats()
        self.date = date
        self.access_log = access_log
        self.draining = False
        self.name = name
        # Request ids look like UUIDs: 20 random hex digits per process, then a counter.
        r = os.urandom(10).hex()
        # The server inlines the generation (hot path): rid_prefix + 12 hex digits.
        self.rid_prefix = f"{r[:8]}-{r[8:12]}-{r[12:16]}-{r[16:20]}-".encode()
        self.rid_counter = 0

    def next_request_id(self) -> bytes:
        self.rid_counter += 1
        return b"%b%012x" % (self.rid_prefix, self.rid_counter)

    def count_error(self, kind: str) -> None:
        errors = self.stats.errors
        errors[kind] = errors.get(kind, 0) + 1
