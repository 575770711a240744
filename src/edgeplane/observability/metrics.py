"""Per-worker request metrics: fixed arrays the hot path adds to.

Owns `RouteMetrics` (the counters and histograms of one route key in one worker) and
`RequestMetrics` (every route's, found by host and key; kept across reloads, so a route
that stays keeps counting on the same arrays). `observe()` is the one call per
request, made where a request ends (`ServerContext.request_done`).

Invariants, for the hot path: no dict lookup by string per request (the route's
arrays hang off the compiled route; the method's index comes from a small dict keyed
by the request's method bytes, whose hash CPython caches); no allocation; a handful of
list-item additions. Series are made from the arrays only when collected
(`samples()`, once a second with workers, and on a scrape).
"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter
from typing import Any

from edgeplane.observability.families import DURATION_BUCKETS, status_label

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
OTHER_METHOD = len(METHODS)
METHOD_INDEX = {m: i for i, m in enumerate(METHODS)}
METHOD_NAMES = [m.decode() for m in METHODS] + ["other"]

# Status slots: 1xx, 2xx, 3xx, then 400..599 one each, then anything else (0: no response).
N_STATUS = 204
STATUS_SLOT = [203] * 1000
for _s in range(100, 400):
    STATUS_SLOT[_s] = _s // 100 - 1
for _s in range(400, 600):
    STATUS_SLOT[_s] = 3 + _s - 400
STATUS_NAMES = ["1xx", "2xx", "3xx", *(str(s) for s in range(400, 600)), "other"]
assert [status_label(s) for s in (150, 250, 350, 404, 599)] == ["1xx", "2xx", "3xx", "404", "599"]

UNMATCHED = "$unmatched"
N_BUCKETS = len(DURATION_BUCKETS) + 1  # the last: +Inf


class RouteMetrics:
    __slots__ = ("stage", "canary", "host", "key", "counts", "duration", "duration_sum", "integration",
                 "integration_sum", "received", "sent")

    def __init__(self, host: str, key: str, stage: str = "$default", canary: bool = False) -> None:
        self.stage = stage
        self.canary = "true" if canary else "false"
        self.host = host
        self.key = key
        self.counts = [0] * ((OTHER_METHOD + 1) * N_STATUS)  # method * N_STATUS + status slot
        self.duration = [0] * N_BUCKETS
        self.duration_sum = 0.0
        self.integration = [0] * N_BUCKETS
        self.integration_sum = 0.0
        self.received = 0
        self.sent = 0


def observe(m: RouteMetrics, method: bytes, status: int, seconds: float, integration: float | None,
            received: int, sent: int) -> None:
    """Count one answered request (the hot path: keep it to list-item additions)."""
    m.counts[METHOD_INDEX.get(method, OTHER_METHOD) * N_STATUS + STATUS_SLOT[status if status < 1000 else 0]] += 1
    m.duration[bisect_left(DURATION_BUCKETS, seconds)] += 1
    m.duration_sum += seconds
    if integration is not None:
        m.integration[bisect_left(DURATION_BUCKETS, integration)] += 1
        m.integration_sum += integration
    m.received += received
    m.sent += sent


def count_request(unmatched: RouteMetrics, req: Any, _bisect: Any = bisect_left, _buckets: Any = DURATION_BUCKETS,
                  _methods: Any = METHOD_INDEX, _slots: Any = STATUS_SLOT, _now: Any = perf_counter) -> None:
    """`observe` for an ended `http.request.Request`, inlined (one call per request on
    the hot path; the defaults bind the module's tables as locals)."""
    route = req.route
    m = route.metrics if route is not None else None
    if m is None:
        m = unmatched
    seconds = _now() - req.t_start
    status = req.status
    m.counts[_methods.get(req.method, OTHER_METHOD) * N_STATUS + _slots[status if status < 1000 else 0]] += 1
    m.duration[_bisect(_buckets, seconds)] += 1
    m.duration_sum += seconds
    integration = req.integration_latency
    if integration is not None:
        m.integration[_bisect(_buckets, integration)] += 1
        m.integration_sum += integration
    m.received += req.body_size
    m.sent += req.response_length


# An authorizer's outcome counts: [allowed, denied, error, cache hits]. The stages add to
# the list directly (one list-item addition per decision).
ALLOWED, DENIED, ERROR, CACHE_HIT = 0, 1, 2, 3
OUTCOMES = ("allowed", "denied", "error")


class AuthorizerOutcomes:
    """Every authorizer's outcome counts in one worker, by name; kept across reloads, so
    an authorizer that stays keeps counting on the same list."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[int]] = {}

    def counts(self, name: str) -> list[int]:
        found = self.by_name.get(name)
        if found is None:
            found = self.by_name[name] = [0, 0, 0, 0]
        return found

    def samples(self) -> dict[str, dict[tuple[str, ...], Any]]:
        decisions: dict[tuple[str, ...], Any] = {}
        hits: dict[tuple[str, ...], Any] = {}
        for name, counts in self.by_name.items():
            for i, outcome in enumerate(OUTCOMES):
                if counts[i]:
                    decisions[(name, outcome)] = counts[i]
            if counts[CACHE_HIT]:
                hits[(name,)] = counts[CACHE_HIT]
        return {"edgeplane_authorizer_decisions": decisions, "edgeplane_authorizer_cache_hits": hits}


class RequestMetrics:
    """Every route's arrays in one worker, by (host, route key)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, bool, str, str], RouteMetrics] = {}
        self.unmatched = self.route("", UNMATCHED)

    def route(self, host: str | None, key: str, stage: str = "$default", canary: bool = False) -> RouteMetrics:
        found = self.routes.get((stage, canary, host or "", key))
        if found is None:
            found = self.routes[(stage, canary, host or "", key)] = RouteMetrics(host or "", key, stage, canary)
        return found

    def samples(self) -> dict[str, dict[tuple[str, ...], Any]]:
        """The request families' samples (see `families`), from the arrays."""
        requests: dict[tuple[str, ...], Any] = {}
        durations: dict[tuple[str, ...], Any] = {}
        integrations: dict[tuple[str, ...], Any] = {}
        received: dict[tuple[str, ...], Any] = {}
        sent: dict[tuple[str, ...], Any] = {}
        for m in self.routes.values():
            labels = (m.stage, m.canary, m.host, m.key)
            for cell, n in enumerate(m.counts):
                if n:
                    method, slot = divmod(cell, N_STATUS)
                    requests[(*labels, METHOD_NAMES[method], STATUS_NAMES[slot])] = n
            if any(m.duration):
                durations[labels] = [*m.duration, m.duration_sum]
            if any(m.integration):
                integrations[labels] = [*m.integration, m.integration_sum]
            if m.received:
                received[labels] = m.received
            if m.sent:
                sent[labels] = m.sent
        return {"edgeplane_requests": requests, "edgeplane_request_duration_seconds": durations,
                "edgeplane_integration_duration_seconds": integrations,
                "edgeplane_request_bytes": received, "edgeplane_response_bytes": sent}
