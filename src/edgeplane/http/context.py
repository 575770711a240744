"""Per-worker shared state that every connection reads: `ServerContext`.

Owns the current snapshot reference (swapped whole on reload), the limits, the sets of
open client connections and WebSocket connections (for draining), counters, the cached
Date header, the access log, the request metrics and the request-id generator. One
`ServerContext` per listener group in a worker process.

`request_done(req, proto)` is where every request ends (answered, cut or failed): it is
counted in the metrics (`observability.metrics.observe`), its spans finished when
tracing is on (`observability.tracing`), and logged, once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from edgeplane.http.responses import DateHeader
from edgeplane.observability.metrics import RequestMetrics, count_request

if TYPE_CHECKING:
    from edgeplane.config.model import Limits
    from edgeplane.runtime.accesslog import AccessLog

log = logging.getLogger("edgeplane.server")


class Stats:
    """Plain counters; read by the admin API. No locks: one event loop per process."""

    __slots__ = ("connections_total", "requests_total", "errors", "refused", "ws_messages", "ws_closes")

    def __init__(self) -> None:
        self.connections_total = 0
        self.requests_total = 0
        self.errors: dict[str, int] = {}
        # (policy, level or name) -> requests it refused: ("throttle", "route"),
        # ("quota", plan), ("authorizer", name). Counted on the refusal path only.
        self.refused: dict[tuple[str, str], int] = {}
        # WebSockets, counted when each closes: (kind, direction) -> messages, where kind
        # is "proxied" or "api" and direction "received" (from the client) or "sent";
        # (kind, close code as text) -> connections closed.
        self.ws_messages: dict[tuple[str, str], int] = {}
        self.ws_closes: dict[tuple[str, str], int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections_total": self.connections_total,
            "requests_total": self.requests_total,
            "errors": dict(sorted(self.errors.items())),
            "refused": self.refused_by_policy(),
        }

    def refused_by_policy(self) -> dict[str, dict[str, int]]:
        """`refused` as `{policy: {level or name: count}}` (`/stats`)."""
        out: dict[str, dict[str, int]] = {}
        for (policy, level), n in sorted(self.refused.items()):
            out.setdefault(policy, {})[level] = n
        return out


def connection_cap(limits: Limits, snapshot: Any) -> int:
    """`limits.max_connections`, or with `auto` (0) what the descriptor limit allows:
    the soft RLIMIT_NOFILE (the runner lifts it to the hard limit first) less one
    descriptor per possible upstream connection and 64 for everything else, so the
    gateway refuses a client before it could no longer open that client's upstream."""
    if limits.max_connections:
        return limits.max_connections
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    config = getattr(snapshot, "config", None)
    upstreams = config.upstreams.values() if config is not None else ()
    reserve = 64 + sum(u.pool.max_connections * len(u.targets) for u in upstreams)
    return max(256, min(soft, 1 << 20) - reserve)


class ServerContext:
    __slots__ = (
        "loop", "snapshot", "limits", "parser_kind", "connections", "stats", "date",
        "access_log", "draining", "rid_prefix", "rid_counter", "name", "websockets",
        "per_ip", "refused", "refused_logged_at", "max_connections", "headless", "evicted",
        "stop_reason", "metrics", "tracer",
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
        metrics: RequestMetrics | None = None,
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
        # The worker's request metrics (the admin listener's own set is never exported).
        self.metrics = metrics if metrics is not None else RequestMetrics()
        self.tracer: Any = None  # `observability.tracing.Tracer` while `tracing` is configured
        self.date = date
        self.access_log = access_log
        self.draining = False
        # Set by the gateway just before it aborts the connections still open at the drain
        # deadline: a request cut then is logged with this reason, not as a client close.
        self.stop_reason: str | None = None
        self.name = name
        # Request ids look like UUIDs: 20 random hex digits per process, then a counter.
        r = os.urandom(10).hex()
        # The server inlines the generation (hot path): rid_prefix + 12 hex digits.
        self.rid_prefix = f"{r[:8]}-{r[8:12]}-{r[12:16]}-{r[16:20]}-".encode()
        self.rid_counter = 0
        self.max_connections = connection_cap(limits, snapshot)
        self.per_ip: dict[str, int] = {}  # open connections per peer (only with a per-IP cap)
        self.refused = 0  # connections refused at accept since the last log line
        self.evicted = 0  # connections evicted at the cap since the last log line
        self.refused_logged_at = 0.0
        # Admitted connections that have not completed a request head yet, oldest first:
        # at the cap the oldest of them makes room for a newcomer (`admit`).
        self.headless: OrderedDict[Any, None] = OrderedDict()

    def admit(self, proto: Any) -> bool:
        """Count a new connection in, or refuse it (connection caps). Open WebSockets
        count toward `max_connections`; the per-address cap counts HTTP connections."""
        limits = self.limits
        if len(self.connections) + len(self.websockets) >= self.max_connections:
            if not self.headless:
                self._refuse("limits.max_connections", self.max_connections, "open connections")
                return False
            # Every slot is taken, some by connections that never completed a request
            # head (idle or trickling ones): the one that had its chance longest goes, so
            # slow clients cannot lock new ones out by holding the cap.
            victim = self.headless.popitem(last=False)[0]
            self.release(victim)
            victim.evict()
            self.count_error("connection_evicted")
            self.evicted += 1
            self._log_refusals("limits.max_connections", self.max_connections, "open connections")
        if limits.max_connections_per_ip:
            ip = proto.peer_ip
            count = self.per_ip.get(ip, 0)
            if count >= limits.max_connections_per_ip:
                self._refuse("limits.max_connections_per_ip", limits.max_connections_per_ip,
                             f"connections from {ip}")
                return False
            self.per_ip[ip] = count + 1
        self.connections.add(proto)
        self.headless[proto] = None
        return True

    def release(self, proto: Any) -> None:
        """A connection admitted by `admit` closed or became a WebSocket."""
        self.connections.discard(proto)
        self.headless.pop(proto, None)
        if self.per_ip:
            ip = proto.peer_ip
            count = self.per_ip.get(ip, 0) - 1
            if count > 0:
                self.per_ip[ip] = count
            else:
                self.per_ip.pop(ip, None)

    def _refuse(self, key: str, cap: int, what: str) -> None:
        self.count_error("connection_limit")
        self.refused += 1
        self._log_refusals(key, cap, what)

    def _log_refusals(self, key: str, cap: int, what: str) -> None:
        now = self.loop.time()
        if now - self.refused_logged_at >= 1.0:  # one line a second, with the counts since
            log.warning("%s: %d %s on this worker is the cap (%s): refused %d new connection(s), "
                        "closed %d that had not sent a complete request head", self.name, cap, what,
                        key, self.refused, self.evicted)
            self.refused = self.evicted = 0
            self.refused_logged_at = now

    def next_request_id(self) -> bytes:
        self.rid_counter += 1
        return b"%b%012x" % (self.rid_prefix, self.rid_counter)

    def count(self, req: Any) -> None:
        """Count an ended request in its route's metrics (unmatched: no route)."""
        count_request(self.metrics.unmatched, req)

    def request_done(self, req: Any, proto: Any) -> None:
        """A request ended: counted, traced, then logged (see the module docstring)."""
        count_request(self.metrics.unmatched, req)
        if self.tracer is not None:
            self.trace_done(req, proto)
        access_log = self.access_log
        if access_log.enabled:
            access_log.record(req, proto)

    def trace_done(self, req: Any, proto: Any) -> None:
        """With tracing on: the request's spans, finished (`observability.tracing`)."""
        try:
            self.tracer.finish(req, proto)
        except Exception:  # a bug: the request's spans are lost, never its log line
            log.exception("tracing: the spans of request %r could not be finished", req.request_id)

    def count_websocket(self, kind: str, received: int, sent: int, code: int | None) -> None:
        """A WebSocket closed: its messages and its close code (`none`: no close frame)."""
        stats = self.stats
        for direction, n in (("received", received), ("sent", sent)):
            stats.ws_messages[(kind, direction)] = stats.ws_messages.get((kind, direction), 0) + n
        label = (kind, str(code) if code is not None else "none")
        stats.ws_closes[label] = stats.ws_closes.get(label, 0) + 1

    def count_refusal(self, policy: str, level: str) -> None:
        refused = self.stats.refused
        refused[(policy, level)] = refused.get((policy, level), 0) + 1

    def count_error(self, kind: str) -> None:
        errors = self.stats.errors
        errors[kind] = errors.get(kind, 0) + 1
