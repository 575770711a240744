"""`routes[].cache`: its schema, its model and the checks that locate every mistake.

Owns `CacheConfig` (per route: ttl, key parameters, entry and capacity bounds, cached
statuses, `public`, `stale_if_error`, `backend`, `invalidation`) and the cross-checks
against the route (method, integration, authorizer) and the file (`cluster:` for the
Redis backend). The defaults follow Amazon API Gateway's stage cache: 300 s, 1 MB
entries, `Cache-Control: max-age=0` honoured only from an authorized caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config

TTL_MAX = 24 * 3600.0
AWS_TTL_MAX = 3600.0
DEFAULT_STATUSES = (200, 203, 204, 300, 301, 308, 404, 410)
KEY_RE = re.compile(r"^\$request\.(header|querystring|path|cookie)\.([A-Za-z0-9!#$%&'*+.^_`|~-]{1,128})$")
_PARAM_RE = re.compile(r"\{([^{}+]+)\+?\}")
UNAUTHORIZED = ("ignore", "ignore_with_header", "fail_403")

CACHE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Response cache of the route (Amazon API Gateway's stage cache): GET and HEAD "
                   "requests answered from stored upstream responses.",
    "properties": {
        "ttl": {"$ref": "#/$defs/duration", "default": "300s",
                "description": "How long an entry is fresh, 1s..24h (past 1h, AWS's limit, `validate` "
                               "warns); an upstream max-age/s-maxage can only shorten it."},
        "key": {"type": "array", "maxItems": 16, "items": {"type": "string"},
                "description": "Request parameters the entry depends on, besides method, host and path: "
                               "$request.header.NAME, $request.querystring.NAME, $request.path.NAME, "
                               "$request.cookie.NAME. Default: the whole query string."},
        "max_entry_bytes": {"$ref": "#/$defs/size", "default": "1MiB",
                            "description": "Larger responses are passed through, not stored (default: "
                                           "1MiB, or the capacity when it is smaller)."},
        "capacity": {"$ref": "#/$defs/size", "default": "64MiB",
                     "description": "Hard bound on the bytes this route's entries take (per worker in "
                                    "memory, in total in Redis); the least recently used go first."},
        "statuses": {"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": 200, "maximum": 599, "not": {"enum": [206, 304]}},
                     "description": "Upstream statuses that may be stored (not 206 or 304: the "
                                    "cache neither assembles ranges nor revalidates)."},
        "public": {"type": "boolean", "default": False,
                   "description": "The responses are the same for every caller: entries are shared across "
                                  "identities even when the route has an authorizer."},
        "stale_if_error": {"$ref": "#/$defs/duration",
                           "description": "When the upstream fails (connect error, reset, timeout, 500/502/"
                                          "503/504), an entry expired less than this long ago is served "
                                          "(X-Cache: Stale). Default: off."},
        "backend": {"enum": ["memory", "redis"], "default": "memory",
                    "description": "memory: per worker; redis: shared by every worker and host through "
                                   "`cluster.redis`."},
        "invalidation": {
            "type": "object", "additionalProperties": False,
            "description": "Who may refresh an entry with `Cache-Control: max-age=0` (or no-cache).",
            "properties": {
                "require_authorization": {"type": "boolean", "default": True,
                                          "description": "Only callers the route's authorizer let in (and "
                                                         "holding `scope`, when set) may refresh."},
                "scope": {"type": "string", "minLength": 1,
                          "description": "A JWT scope the caller needs to refresh (jwt authorizers)."},
                "unauthorized": {"enum": list(UNAUTHORIZED), "default": "ignore_with_header",
                                 "description": "Any other caller's refresh: ignore (answer from the "
                                                "cache), ignore_with_header (also a Warning header), "
                                                "fail_403."},
            },
        },
    },
}


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl: float = 300.0
    key: tuple[tuple[str, str], ...] | None = None  # (kind, name); None: the whole query string
    max_entry_bytes: int = 1 << 20
    capacity: int = 64 << 20
    statuses: frozenset[int] = frozenset(DEFAULT_STATUSES)
    public: bool = False
    stale_if_error: float = 0.0
    backend: str = "memory"
    require_authorization: bool = True
    scope: str | None = None
    unauthorized: str = "ignore_with_header"


def load_cache(value: Any, path: tuple[Any, ...], ctx: LoadContext) -> CacheConfig | None:
    if not isinstance(value, dict):
        return None
    ttl = ctx.duration(value, "ttl", path, 300.0, low=1.0, high=TTL_MAX, low_inclusive=True)
    if ttl > AWS_TTL_MAX:
        ctx.warn(path + ("ttl",), f"{ttl:g}s is past Amazon API Gateway's {AWS_TTL_MAX:g} s cache TTL limit")
    key: tuple[tuple[str, str], ...] | None = None
    if isinstance(value.get("key"), list):
        parsed = []
        for i, item in enumerate(value["key"]):
            m = KEY_RE.match(item) if isinstance(item, str) else None
            if m is None:
                if isinstance(item, str):
                    ctx.fail(path + ("key", i), f"{item!r} is not $request.header.NAME, $request.querystring.NAME, "
                                                "$request.path.NAME or $request.cookie.NAME")
                continue
            kind, name = m.group(1), m.group(2)
            parsed.append((kind, name.lower() if kind == "header" else name))
        key = tuple(parsed)
    capacity = ctx.size(value, "capacity", path, 64 << 20, low=4096)
    max_entry = ctx.size(value, "max_entry_bytes", path, min(1 << 20, capacity), low=1)
    if max_entry > capacity:
        ctx.fail(path + ("max_entry_bytes",), f"{max_entry} bytes is more than the capacity ({capacity} bytes)")
    statuses = value.get("statuses")
    found = value.get("invalidation")
    inv: dict[str, Any] = found if isinstance(found, dict) else {}
    scope = inv.get("scope")
    return CacheConfig(
        ttl=ttl, key=key, max_entry_bytes=max_entry, capacity=capacity,
        statuses=frozenset(s for s in statuses if isinstance(s, int)) if isinstance(statuses, list)
        else frozenset(DEFAULT_STATUSES),
        public=value.get("public") is True,
        stale_if_error=ctx.duration(value, "stale_if_error", path, 0.0, high=TTL_MAX, low_inclusive=True),
        backend=value.get("backend", "memory") if value.get("backend") in ("memory", "redis") else "memory",
        require_authorization=inv.get("require_authorization", True) is not False,
        scope=scope if isinstance(scope, str) else None,
        unauthorized=inv.get("unauthorized", "ignore_with_header") if inv.get("unauthorized") in UNAUTHORIZED
        else "ignore_with_header",
    )


def check_cache(config: Config, ctx: LoadContext) -> None:
    """What a route's `cache` can only be judged against: its method, integration and
    authorizer, and the file's `cluster`."""
    for r in config.routes:
        cache = r.policies.get("cache")
        if cache is None:
            continue
        path: tuple[Any, ...] = ("routes", r.index, "cache")
        if r.method not in (None, "GET", "HEAD"):
            ctx.fail(path, f"only GET and HEAD responses are cached; route {r.key!r} is {r.method}")
        elif r.method == "HEAD":
            ctx.fail(path, f"route {r.key!r} takes only HEAD, which never fills an entry (HEAD is answered "
                           "from the GET entry): cache its GET route, or make it ANY")
        if r.integration.type != "http":
            ctx.fail(path, f"only http integrations are cached; this route's is {r.integration.type!r}")
        if cache.backend == "redis" and config.cluster is None:
            ctx.fail(path + ("backend",), "the redis backend needs `cluster.redis`")
        kind = ctx.authorizer_types.get(r.auth) if r.auth else None
        if cache.scope is not None and kind != "jwt":
            ctx.fail(path + ("invalidation", "scope"), "a scope comes from a jwt authorizer and the route has none")
        elif cache.require_authorization and r.auth is None:
            ctx.warn(path + ("invalidation",), "the route has no authorizer: no client may refresh an entry "
                                               "(Cache-Control: max-age=0 is ignored); set "
                                               "require_authorization: false to let every client refresh")
        for i, (kind_, name) in enumerate(cache.key or ()):
            if kind_ == "path" and name not in _PARAM_RE.findall(r.path or ""):
                ctx.fail(path + ("key", i), f"route {r.key!r} has no path parameter {{{name}}}")
