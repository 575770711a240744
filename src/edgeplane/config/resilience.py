"""An upstream's resilience settings: `lb`, `outlier_detection`, `panic_threshold` and
`retries` (Envoy's cluster settings, under the names its users know).

Owns their schema (merged into the upstream's), their models and their loading, each
error located. `retries` is the upstream's default; a route's `integration.retries`
replaces it for that route.

Invariants: an upstream without these keys behaves as before (round robin; a target
that failed to connect is skipped for a second; a failed request is retried once, only
on a reused connection that the upstream closed before answering).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

# (the loader's `LoadContext` and `Path` are not imported: `config.model` imports this
# module's models, and the context imports the model)
Path = tuple[Any, ...]

LB_POLICIES = ("round_robin", "least_request", "random", "ring_hash", "maglev")
HASH_KEYS = {"$request.header.": "header", "$request.cookie.": "cookie", "$request.path.": "path"}
RETRY_KINDS = ("connect-failure", "reset")  # and statuses 500..599


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """`outlier_detection`: passive health from the answers themselves."""

    consecutive_5xx: int = 5  # 0: off
    consecutive_connect_failures: int = 3  # 0: off
    base_ejection_time: float = 30.0  # an endpoint is out base x (times ejected) ...
    max_ejection_time: float = 300.0  # ... at most this long
    max_ejection_percent: int = 50  # of an upstream's endpoints out at once (at least one may go)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """`dns`: how hostname targets are resolved (aiodns: A and AAAA, every address an endpoint)."""

    min_ttl: float = 5.0  # an answer is kept at least this long ...
    max_ttl: float = 300.0  # ... and at most this long, whatever its TTL says
    resolvers: tuple[str, ...] = ()  # "ip" or "ip:port"; default: the system's (/etc/resolv.conf)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """`circuit_breaker`: limits of the whole upstream (all its targets); past one, a
    request is answered 503 at once, never queued. 0: no limit."""

    max_connections: int = 0  # open connections (in use, idle, connecting)
    max_pending: int = 0  # requests waiting for a connection
    max_requests: int = 0  # requests in flight
    max_retries: int = 0  # retries in flight


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """`health_check`: active HTTP checks of every target."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy: int = 2  # passes in a row that make an unhealthy target healthy
    unhealthy: int = 3  # failures in a row that make a healthy target unhealthy
    statuses: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """`retries`: which failures are tried again, how often, and how fast."""

    retry_on: tuple[str, ...] = ("connect-failure",)  # kinds, and statuses as "503"
    attempts: int = 2  # tries in all, the first included
    backoff_base: float = 0.025  # seconds; full jitter over base x 2^(retry - 1) ...
    backoff_max: float = 0.25  # ... capped here
    budget: float = 0.2  # retries in flight at most this share of the upstream's active requests ...
    min_retry_concurrency: int = 3  # ... or this many, whichever is more (Envoy's retry budget)
    methods: str = "idempotent"  # idempotent | all: which requests may be sent twice
    per_try_timeout: float | None = None  # an attempt's wait for its response head (then as a 504)

    @property
    def statuses(self) -> frozenset[int]:
        return frozenset(int(k) for k in self.retry_on if k.isdigit())


@dataclass(frozen=True, slots=True)
class Resilience:
    lb: str = "round_robin"
    lb_key: str = "source_ip:"  # ring_hash / maglev: what a request is hashed by (`hashing.request_key`)
    outlier: OutlierConfig | None = None
    panic_threshold: int = 50  # percent healthy below which every endpoint is used (0: never)
    retries: RetryConfig | None = None
    health_check: HealthCheckConfig | None = None
    circuit_breaker: BreakerConfig | None = None
    dns: DnsConfig = DnsConfig()


_DURATION = {"$ref": "#/$defs/duration"}
RETRIES_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "description": "Try a failed request again, on another endpoint where there is one.",
    "properties": {
        "retry_on": {"type": "array", "minItems": 1, "uniqueItems": True,
                     "items": {"anyOf": [{"enum": list(RETRY_KINDS)},
                                         {"type": "integer", "minimum": 500, "maximum": 599}]}},
        "attempts": {"type": "integer", "minimum": 1, "maximum": 10, "default": 2},
        "backoff": {"type": "object", "additionalProperties": False,
                    "properties": {"base": _DURATION, "max": _DURATION}},
        "budget": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2},
        "min_retry_concurrency": {"type": "integer", "minimum": 0, "default": 3},
        "methods": {"enum": ["idempotent", "all"], "default": "idempotent"},
        "per_try_timeout": _DURATION,
    },
}
SCHEMA: dict[str, Any] = {
    "lb": {"type": "object", "additionalProperties": False, "required": ["policy"],
           "properties": {"policy": {"enum": list(LB_POLICIES)},
                          "key": {"type": "string", "description": "ring_hash / maglev: $request.header.NAME, "
                                                                   "$request.cookie.NAME, $request.path.NAME or "
                                                                   "$context.identity.sourceIp (the default)"}}},
    "outlier_detection": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "consecutive_5xx": {"type": "integer", "minimum": 0, "default": 5},
            "consecutive_connect_failures": {"type": "integer", "minimum": 0, "default": 3},
            "base_ejection_time": _DURATION, "max_ejection_time": _DURATION,
            "max_ejection_percent": {"type": "integer", "minimum": 0, "maximum": 100, "default": 50},
        },
    },
    "panic_threshold": {"type": "integer", "minimum": 0, "maximum": 100, "default": 50},
    "retries": RETRIES_SCHEMA,
    "dns": {
        "type": "object", "additionalProperties": False,
        "properties": {"min_ttl": _DURATION, "max_ttl": _DURATION,
                       "resolvers": {"type": "array", "minItems": 1, "items": {"type": "string"}}},
    },
    "circuit_breaker": {
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {key: {"type": "integer", "minimum": 0} for key in
                       ("max_connections", "max_pending", "max_requests", "max_retries")},
    },
    "health_check": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "pattern": "^/[!-~]*$", "default": "/healthz"},
            "interval": _DURATION, "timeout": _DURATION,
            "healthy": {"type": "integer", "minimum": 1, "maximum": 100, "default": 2},
            "unhealthy": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
            "statuses": {"type": "array", "minItems": 1, "uniqueItems": True,
                         "items": {"type": "integer", "minimum": 100, "maximum": 599}},
        },
    },
}


def load(spec: dict[str, Any], path: Path, ctx: Any) -> Resilience:
    """The resilience settings of one upstream (`spec`, at `path`)."""
    lb = spec.get("lb")
    policy = lb.get("policy") if isinstance(lb, dict) else None
    key = lb.get("key") if isinstance(lb, dict) else None
    lb_key = "source_ip:"
    if isinstance(key, str):
        found_key = next(((kind, key[len(p):]) for p, kind in HASH_KEYS.items() if key.startswith(p)), None)
        if policy not in ("ring_hash", "maglev"):
            ctx.fail(path + ("lb", "key"), "only used with ring_hash or maglev")
        elif found_key is not None and found_key[1]:
            kind, name = found_key
            lb_key = f"{kind}:{name.lower() if kind == 'header' else name}"
        elif key != "$context.identity.sourceIp":
            ctx.fail(path + ("lb", "key"), "expected $request.header.NAME, $request.cookie.NAME, "
                                           "$request.path.NAME or $context.identity.sourceIp")
    found = spec.get("outlier_detection")
    outlier = None
    if isinstance(found, dict):
        p = path + ("outlier_detection",)
        d = OutlierConfig()
        outlier = OutlierConfig(
            _int(found, "consecutive_5xx", d.consecutive_5xx),
            _int(found, "consecutive_connect_failures", d.consecutive_connect_failures),
            ctx.duration(found, "base_ejection_time", p, d.base_ejection_time),
            ctx.duration(found, "max_ejection_time", p, d.max_ejection_time),
            _int(found, "max_ejection_percent", d.max_ejection_percent))
        if outlier.max_ejection_time < outlier.base_ejection_time:
            ctx.fail(p + ("max_ejection_time",), "must not be shorter than base_ejection_time")
    panic = spec.get("panic_threshold", 50)
    return Resilience(policy if policy in LB_POLICIES else "round_robin", lb_key, outlier,
                      panic if isinstance(panic, int) and not isinstance(panic, bool) else 50,
                      load_retries(spec.get("retries"), path + ("retries",), ctx),
                      _health_check(spec.get("health_check"), path + ("health_check",), ctx),
                      _breaker(spec.get("circuit_breaker")), _dns(spec.get("dns"), path + ("dns",), ctx))


def _dns(found: Any, path: Path, ctx: Any) -> DnsConfig:
    if not isinstance(found, dict):
        return DnsConfig()
    d = DnsConfig()
    low = ctx.duration(found, "min_ttl", path, d.min_ttl)
    high = ctx.duration(found, "max_ttl", path, d.max_ttl)
    if high < low:
        ctx.fail(path + ("max_ttl",), "must not be shorter than min_ttl")
    servers = found.get("resolvers")
    resolvers = tuple(s for s in servers if isinstance(s, str)) if isinstance(servers, list) else ()
    for i, server in enumerate(resolvers):
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        try:
            ipaddress.ip_address(host or server)
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError
        except ValueError:
            ctx.fail(path + ("resolvers", i), f"expected an IP address, or 'ip:port', got {server!r}")
    return DnsConfig(low, high, resolvers)


def _breaker(found: Any) -> BreakerConfig | None:
    if not isinstance(found, dict):
        return None
    return BreakerConfig(*(_int(found, key, 0) for key in
                           ("max_connections", "max_pending", "max_requests", "max_retries")))


def _health_check(found: Any, path: Path, ctx: Any) -> HealthCheckConfig | None:
    if not isinstance(found, dict):
        return None
    d = HealthCheckConfig()
    interval = ctx.duration(found, "interval", path, d.interval)
    timeout = ctx.duration(found, "timeout", path, d.timeout)
    if timeout > interval:
        ctx.fail(path + ("timeout",), "must not be longer than the interval")
    statuses = found.get("statuses")
    return HealthCheckConfig(
        found["path"] if isinstance(found.get("path"), str) else d.path, interval, timeout,
        _int(found, "healthy", d.healthy), _int(found, "unhealthy", d.unhealthy),
        tuple(s for s in statuses if isinstance(s, int)) if isinstance(statuses, list) else d.statuses)


def load_retries(found: Any, path: Path, ctx: Any) -> RetryConfig | None:
    if not isinstance(found, dict):
        return None
    d = RetryConfig()
    backoff: dict[str, Any] = found["backoff"] if isinstance(found.get("backoff"), dict) else {}
    base = ctx.duration(backoff, "base", path + ("backoff",), d.backoff_base)
    most = ctx.duration(backoff, "max", path + ("backoff",), d.backoff_max)
    if most < base:
        ctx.fail(path + ("backoff", "max"), "must not be shorter than base")
    kinds = found.get("retry_on", list(d.retry_on))
    budget = found.get("budget", d.budget)
    return RetryConfig(
        tuple(str(k) for k in kinds) if isinstance(kinds, list) else d.retry_on,
        _int(found, "attempts", d.attempts), base, most,
        float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else d.budget,
        _int(found, "min_retry_concurrency", d.min_retry_concurrency),
        str(found["methods"]) if found.get("methods") in ("idempotent", "all") else d.methods,
        ctx.duration(found, "per_try_timeout", path, 0.0, low=0.001) if "per_try_timeout" in found else None)


def _int(section: dict[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
