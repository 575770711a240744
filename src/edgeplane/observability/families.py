"""Every metric family edgeplane exports: name, type, label names, help.

Names follow Prometheus conventions: the `edgeplane_` prefix, base units (seconds,
bytes), `_total` on counters (the exposition adds it; a family is named without it).
Labels are route keys and configured names, never raw paths or client values, so the
number of series is bounded by the config.

A sample is keyed by its label values, in the family's label order. A histogram's
value is `[bucket counts..., +Inf count, sum]`, the counts per bucket (not cumulative:
the exposition accumulates), so merging two is adding them element by element.
"""

from __future__ import annotations

import dataclasses

# Request and integration durations, in seconds: from half a millisecond (a mock or a
# cached answer) to the 30 s integration timeout.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    type: str  # counter | gauge | histogram | info
    labels: tuple[str, ...]
    help: str


ROUTE = ("stage", "canary", "host", "route")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("edgeplane_requests", "counter", (*ROUTE, "method", "status"),
           "Requests answered, by route key (host '' for any host; route '$unmatched' when no "
           "route matched), method, and status: the class (2xx, 3xx, 1xx) or, for 4xx and 5xx, "
           "the exact code."),
    Family("edgeplane_request_duration_seconds", "histogram", ROUTE,
           "From the first byte of the request head to the last byte of the response."),
    Family("edgeplane_integration_duration_seconds", "histogram", ROUTE,
           "From sending the request to the upstream to the end of its response head."),
    Family("edgeplane_request_bytes", "counter", ROUTE, "Request body bytes received."),
    Family("edgeplane_response_bytes", "counter", ROUTE, "Response body bytes sent."),
    Family("edgeplane_gateway_errors", "counter", ("kind",),
           "Requests and connections the gateway answered or ended itself, by reason "
           "(the status it sent, or client_closed, send_timeout, connection_refused, ...)."),
    Family("edgeplane_throttled_requests", "counter", ("level",),
           "Requests refused 429 by a throttle, by level: server, route, client, plan, websocket "
           "(a WebSocket API's new connections)."),
    Family("edgeplane_quota_refusals", "counter", ("plan",), "Requests refused 429 by a usage plan's quota."),
    Family("edgeplane_connections", "counter", ("listener",), "Client connections accepted."),
    Family("edgeplane_open_connections", "gauge", ("listener",), "Client connections open now."),
    Family("edgeplane_websockets_open", "gauge", ("kind",),
           "WebSocket connections open now, by kind: proxied, api (a WebSocket API's)."),
    Family("edgeplane_upstream_connections_open", "gauge", ("upstream", "target"),
           "Upstream connections open now (in use and idle)."),
    Family("edgeplane_upstream_connections_idle", "gauge", ("upstream", "target"),
           "Upstream connections idle in the pool now."),
    Family("edgeplane_upstream_connections_opened", "counter", ("upstream", "target"),
           "Upstream connections opened."),
    Family("edgeplane_upstream_connections_reused", "counter", ("upstream", "target"),
           "Requests sent on an upstream connection that had served one before."),
    Family("edgeplane_upstream_connect_failures", "counter", ("upstream", "target"),
           "Failed attempts to connect to an upstream target."),
    Family("edgeplane_upstream_requests", "counter", ("upstream", "target"),
           "Requests sent to an upstream target."),
    Family("edgeplane_upstream_endpoint_healthy", "gauge", ("upstream", "target"),
           "1 per worker to which the target is usable now (not ejected, not failing to connect)."),
    Family("edgeplane_upstream_ejections", "counter", ("upstream", "target"),
           "Times outlier detection ejected the target."),
    Family("edgeplane_upstream_retries", "counter", ("upstream",), "Requests sent again by a retry policy."),
    Family("edgeplane_upstream_circuit_breaker_open", "counter", ("upstream", "limit"),
           "Requests (or retries) a circuit-breaker limit refused."),
    Family("edgeplane_upstream_retries_refused", "counter", ("upstream",),
           "Retries the retry budget did not allow."),
    Family("edgeplane_cache_lookups", "counter", ("stage", "route", "result"),
           "Requests of a cached route by what the cache did: hit (answered from it), miss (sent "
           "upstream), refresh (an authorized Cache-Control: max-age=0), stale (a stale entry "
           "answered for a failed upstream), coalesced (waited for another request's fill)."),
    Family("edgeplane_cache_evictions", "counter", ("stage", "route"),
           "Entries removed to keep a route's cache within its capacity."),
    Family("edgeplane_cache_stored", "counter", ("stage", "route"), "Responses stored in a route's cache."),
    Family("edgeplane_cache_bytes", "gauge", ("stage", "route"),
           "Bytes a route's in-memory cache holds now, per worker (summed over workers)."),
    Family("edgeplane_cache_entries", "gauge", ("stage", "route"),
           "Entries a route's in-memory cache holds now (summed over workers)."),
    Family("edgeplane_function_pool_threads", "gauge", (), "Threads that run synchronous function handlers."),
    Family("edgeplane_function_pool_busy", "gauge", (),
           "Synchronous function calls running or queued in the pool now."),
    Family("edgeplane_function_invocations", "counter", ("result",),
           "Function integration calls by result: ok, error (raised), timeout, malformed (a bad answer)."),
    Family("edgeplane_jwks_fetches", "counter", ("authorizer",), "JWKS fetches of a JWT authorizer with a jwks_url."),
    Family("edgeplane_jwks_fetch_failures", "counter", ("authorizer",), "JWKS fetches that failed."),
    Family("edgeplane_authorizer_calls", "counter", ("authorizer",),
           "Calls to a custom (HTTP) authorizer (answers from its decision cache are not calls)."),
    Family("edgeplane_authorizer_call_failures", "counter", ("authorizer",),
           "Custom authorizer calls that failed (unreachable, timed out, a bad answer)."),
    Family("edgeplane_authorizer_decisions", "counter", ("authorizer", "outcome"),
           "Requests an authorizer decided, by outcome: allowed, denied (401/403), error (it "
           "could not decide: a custom authorizer unreachable or answering badly, no JWKS yet)."),
    Family("edgeplane_authorizer_cache_hits", "counter", ("authorizer",),
           "Decisions answered from the authorizer's cache (JWT verification cache, custom "
           "authorizer result cache); they are also counted in the decisions."),
    Family("edgeplane_websocket_api_connections", "counter", (), "WebSocket API connections opened."),
    Family("edgeplane_websocket_messages", "counter", ("kind", "direction"),
           "Messages of WebSockets that closed, by kind (proxied, api) and direction (received "
           "from the client, sent to it); counted when the connection closes."),
    Family("edgeplane_websocket_closes", "counter", ("kind", "code"),
           "WebSocket connections closed, by kind and close code ('none': no close frame)."),
    Family("edgeplane_trace_spans", "counter", ("result",),
           "Spans of sampled requests, by result: exported (the collector took them), dropped "
           "(the export queue was full), failed (their export failed)."),
    Family("edgeplane_access_log_lines", "counter", (), "Access-log lines written to the buffer."),
    Family("edgeplane_access_log_dropped_lines", "counter", (),
           "Access-log lines dropped: the destination did not keep up (queue_bytes full) or failed."),
    Family("edgeplane_reloads", "counter", ("result",), "Config reloads, by result (success, failure)."),
    Family("edgeplane_config_info", "info", ("hash",), "The config being served: its hash (as logged)."),
    Family("edgeplane_build_info", "info", ("version", "python"), "The edgeplane build."),
)}


def status_label(status: int) -> str:
    """The `status` label: the class below 400, the exact code for 4xx and 5xx."""
    if 400 <= status <= 599:
        return str(status)
    if 100 <= status <= 399:
        return f"{status // 100}xx"
    return "other"
