"""The `cache` policy unit: Amazon API Gateway's stage cache, per route.

Owns the route-level `cache` key (`model`), `CacheStage` on each cached route (phase
TRAFFIC, order 30: after throttles and quotas, as AWS counts cached requests too), and
the per-gateway `CacheRuntime`: the routes' stores (in memory, or Redis with
`backend: redis`), the admin flush and the counters for `/stats` and `/metrics`.

A store belongs to one route of one stage (its `limit_key`), its integration and its
cache settings: a reload that changes none of them keeps the entries; any other change
starts empty. In-memory stores are per worker; `DELETE /cache` on the admin API
reaches every worker (`runtime.admin`).
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from typing import TYPE_CHECKING, Any

from edgeplane.plugins import Phase, Policy
from edgeplane.policies.cache.keys import KeyMaker
from edgeplane.policies.cache.model import CACHE_SCHEMA, check_cache, load_cache
from edgeplane.policies.cache.stage import CacheStage
from edgeplane.policies.cache.store import MemoryStore

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.plugins import CompileContext, RuntimeContext
    from edgeplane.policies.cache.model import CacheConfig


def store_id(route: RouteConfig, cfg: CacheConfig) -> str:
    """Names a route's store: its route and stage, integration and cache settings."""
    ident = f"{route.limit_key}|{route.integration!r}|{cfg!r}|{route.auth}"
    return hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()


class CacheRuntime:
    """One gateway's caches: the stores its snapshots use (weakly held: a store lives as
    long as a compiled route uses it), the Redis client, and the flush."""

    def __init__(self) -> None:
        self.stores: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.routes: dict[str, tuple[str, str]] = {}  # store id -> (stage, route key)
        self.client: Any = None
        self.prefix = "edgeplane:"
        self.timeout = 0.1
        self.tasks: set[asyncio.Task[Any]] = set()

    def store(self, route: RouteConfig, cfg: CacheConfig) -> Any:
        sid = store_id(route, cfg)
        found = self.stores.get(sid)
        if found is None:
            if cfg.backend == "redis" and self.client is not None:
                from edgeplane.policies.cache.redis_store import RedisStore

                found = RedisStore(self.client, self.prefix, sid, cfg.capacity, self.timeout, self.tasks)
            else:
                found = MemoryStore(cfg.capacity)
            self.stores[sid] = found
        self.routes[sid] = (route.stage, route.key)
        return found

    def live(self) -> list[tuple[str, str, Any]]:
        """(stage, route key, store) of every store in use."""
        return [(*self.routes.get(sid, ("$default", "?")), store) for sid, store in list(self.stores.items())]

    async def flush(self, route: str | None, path: str | None, stage: str | None) -> int:
        """Remove the entries of every route, or one route (key as written), of one
        request path or all, in every stage or one; how many entries were removed."""
        n = 0
        raw_path = path.encode("latin-1") if path is not None else None
        for st, key, store in self.live():
            if (route is not None and key != route) or (stage is not None and st != stage):
                continue
            if store.sync:
                n += store.flush(raw_path)
            else:
                n += await store.flush(raw_path)
        return n

    def metric_samples(self) -> list[tuple[str, tuple[str, ...], Any, float]]:
        out: list[tuple[str, tuple[str, ...], Any, float]] = []
        for stage, key, store in self.live():
            s = store.stats
            labels = (stage, key)
            for result, value in (("hit", s.hits), ("miss", s.misses), ("refresh", s.refreshes),
                                  ("stale", s.stale), ("coalesced", s.coalesced)):
                out.append(("edgeplane_cache_lookups", (*labels, result), store, value))
            out.append(("edgeplane_cache_evictions", labels, store, s.evictions))
            out.append(("edgeplane_cache_stored", labels, store, s.stored))
            if store.sync:
                out.append(("edgeplane_cache_bytes", labels, None, store.used))
                out.append(("edgeplane_cache_entries", labels, None, len(store.items)))
        return out


def _identity_sources(route: RouteConfig, ctx: CompileContext) -> tuple[tuple[str, bytes], ...]:
    auth = ctx.authorizer(route, "http")
    out = []
    for source in getattr(auth, "identity_source", ()) or ():
        parts = source.split(".")
        if len(parts) == 3 and parts[0] == "$request" and parts[1] in ("header", "querystring"):
            name = parts[2].lower() if parts[1] == "header" else parts[2]
            out.append((parts[1], name.encode("latin-1")))
    return tuple(out)


class CachePolicy(Policy):
    name = "cache"
    phase = Phase.TRAFFIC
    order = 30
    route_keys = {"cache": {"$ref": "#/$defs/cache"}}
    defs = {"cache": CACHE_SCHEMA}

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return load_cache(value, path, ctx)

    def check(self, config: Config, ctx: LoadContext) -> None:
        check_cache(config, ctx)

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return "cache" in route.policies

    def response_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        # the cache's own headers: an upstream's copies would contradict them
        return frozenset((b"x-cache", b"age")) if "cache" in route.policies else frozenset()

    async def start(self, runtime: RuntimeContext) -> None:
        state = CacheRuntime()
        config = runtime.config
        previous = runtime.previous.state.get(self.name) if runtime.previous is not None else None
        if isinstance(previous, CacheRuntime):  # unchanged routes keep their entries
            for sid, store in list(previous.stores.items()):
                if store.sync:
                    state.stores[sid] = store
            state.routes.update(previous.routes)
        if config.cluster is not None and any(
                getattr(r.policies.get("cache"), "backend", None) == "redis" for r in _all_routes(config)):
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            c = config.cluster
            state.client = Redis.from_url(c.redis, socket_timeout=max(c.timeout, 0.05) * 10,
                                          socket_connect_timeout=max(c.timeout, 0.05) * 10,
                                          retry=Retry(NoBackoff(), 0), health_check_interval=0,
                                          decode_responses=False)
            state.prefix, state.timeout = c.key_prefix, c.timeout
        runtime.state[self.name] = state

    async def stop(self, runtime: RuntimeContext) -> None:
        state = runtime.state.get(self.name)
        if not isinstance(state, CacheRuntime):
            return
        for task in list(state.tasks):
            task.cancel()
        if state.client is not None:
            await state.client.aclose()

    def compile(self, route: RouteConfig, ctx: CompileContext) -> CacheStage | None:
        cfg = route.policies.get("cache")
        state = ctx.runtime.get(self.name)
        if cfg is None or not isinstance(state, CacheRuntime):
            return None
        identity = route.auth is not None and not cfg.public
        keys = KeyMaker(cfg.key, identity, _identity_sources(route, ctx) if identity else ())
        from edgeplane.upstream.proxy import RESPONSE_SKIP

        skip = RESPONSE_SKIP | frozenset(
            name for p in ctx.config.registry.policies() for name in p.response_headers(route, ctx.config))
        timeout = getattr(route.integration, "timeout", 29.0) or 29.0
        return CacheStage(state.store(route, cfg), cfg, keys, skip, route.auth is not None, timeout)

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        state = runtime.state.get(self.name)
        if not isinstance(state, CacheRuntime):
            return None
        live = state.live()
        if not live:
            return None
        return {"cache": {key if stage == "$default" else f"{key} @{stage}": store.telemetry()
                          for stage, key, store in live}}


def _all_routes(config: Config) -> list[RouteConfig]:
    from edgeplane.config.stages import views

    return [r for _, _, served in views(config) for r in served.routes]


plugin = CachePolicy()
