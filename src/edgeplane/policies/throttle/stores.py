"""Where each throttle level lives: one small factory per store, the same chain contract.

A throttle level is a server-wide bucket, a route's bucket, a route's per-client buckets
or a usage plan's per-key buckets. This module decides, from the deployment, which kind
of bucket backs each level, and which chain checks them:

- `LocalLimits` (``workers: 1``, no cluster): in-process `throttle.TokenBucket` /
  `throttle.BucketMap`, checked by the inlined `throttle.ThrottleChain`: the fastest path.
- `SharedLimits` (``workers: N``): buckets in the supervisor's shared-memory tables
  (`shared_limits`, and `shared_keys` for per-client and per-key levels), exact across
  the workers of one host; checked by `throttle.LevelChain`.
- `ClusterLimits` (``cluster:`` set): `cluster.LeasedLimit` buckets in Redis, exact across
  hosts within the lease bound; checked by `throttle.LevelChain`.

Every factory answers the same four questions -- `server()`, `route(rc)`, `plan(name, rc)`,
`chain(route_level, server_level)` -- so the throttle stage does not know which store it
talks to. Limit indices in shared memory come from the supervisor's slot map
(`slots.SlotMap`: a limit keeps its slot across reloads while its identity is
unchanged), the same in every worker. Redis key names come from the route key and plan
name, the same on every host with the same config; the plans' per-route buckets (AWS
method throttling) are named `plan:NAME:ROUTE KEY` there. WebSocket APIs'
new-connection buckets are plain slots too (`runtime.gateway_ws`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from edgeplane.policies.throttle.buckets import BucketMap, LevelChain, Policy, ThrottleChain, TokenBucket
from edgeplane.policies.throttle.slots import SlotMap, plan_identity, route_identity

if TYPE_CHECKING:
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.policies.throttle.model import ThrottleConfig

__all__ = ["plans_of", "LocalLimits", "SharedLimits", "ClusterLimits", "limits_for"]


def plans_of(config: Config) -> dict[str, Any]:
    """The usage plans (`usage_plans` section), by name."""
    plans: dict[str, Any] = config.policies.get("usage_plans") or {}
    return plans


def _plan_throttle(config: Config, name: str, route: RouteConfig | None) -> Any:
    """The plan's throttle on `route`: its per-route one if it has one, else its default."""
    plan = plans_of(config)[name]
    if route is not None and route.key in plan.route_throttles:
        return plan.route_throttles[route.key]
    return plan.throttle


class LocalLimits:
    """One process owns every bucket. Built again on a reload with the previous one as
    `previous`: a limit whose identity (its level, route key or plan, and settings) is
    unchanged keeps its bucket, tokens and per-client state included."""

    def __init__(self, config: Config, previous: LocalLimits | None = None) -> None:
        self.config = config
        self._kept: dict[tuple[Any, ...], Any] = previous._made if previous is not None else {}
        self._made: dict[tuple[Any, ...], Any] = {}  # identity -> bucket, for the next reload
        t = config.policies.get("throttle")
        self._server = (self._keep(("server", t), lambda: TokenBucket(t.rate, t.burst, policy="server"))
                        if t is not None else None)

    def _keep(self, identity: tuple[Any, ...], make: Any) -> Any:
        bucket = self._made.get(identity)  # one bucket per identity, even when asked twice
        if bucket is None:
            bucket = self._kept.get(identity)
        if bucket is None:
            bucket = make()
        self._made[identity] = bucket
        return bucket

    def server(self) -> Any:
        return self._server

    def route(self, rc: RouteConfig) -> Any:
        t = cast("ThrottleConfig", rc.policies.get("throttle"))  # route(): only for a throttled route
        if t.key is None:
            return self._keep(("route", rc.limit_key, t), lambda: TokenBucket(t.rate, t.burst, policy="route"))
        return self._keep(("client", rc.limit_key, t), lambda: BucketMap(t.rate, t.burst, policy="client"))

    def plan(self, name: str, route: RouteConfig | None = None) -> Any:
        t = _plan_throttle(self.config, name, route)
        key = None if route is None else (route.host, route.key)
        return self._keep(("plan", name, key, t), lambda: BucketMap(t.rate, t.burst, policy="plan"))

    def chain(self, route: Any, server: Any) -> Any:
        return ThrottleChain(route=route, server=server)


class SharedLimits:
    """Buckets in the supervisor's shared-memory tables (one host, N workers)."""

    def __init__(self, config: Config, table: Any, keyed_table: Any = None, slots: SlotMap | None = None) -> None:
        self.config = config
        self.table = table
        self.keyed_table = keyed_table
        self.slots = slots if slots is not None else SlotMap.initial(config)
        t = config.policies.get("throttle")
        self._server = (self._bucket(self.slots.index("plain", f"server {t!r}"), t.rate, t.burst, "server")
                        if t is not None else None)

    def _bucket(self, index: int, rate: float, burst: int, policy: str) -> Any:
        bucket = self.table.bucket(index, rate, burst)
        bucket._policy = Policy(policy, rate, burst)
        return bucket

    def _keyed(self, index: int, rate: float, burst: int, policy: str) -> Any:
        if self.keyed_table is None:
            raise ValueError("per-client limits across workers need the keyed shared table")
        limit = self.keyed_table.limit(index, rate, burst)
        limit._policy = Policy(policy, rate, burst)  # copied into each bucket view it makes
        return limit

    def server(self) -> Any:
        return self._server

    def route(self, rc: RouteConfig) -> Any:
        t = cast("ThrottleConfig", rc.policies.get("throttle"))  # route(): only for a throttled route
        kind, identity = route_identity(rc, t)
        if kind == "plain":
            return self._bucket(self.slots.index(kind, identity), t.rate, t.burst, "route")
        return self._keyed(self.slots.index(kind, identity), t.rate, t.burst, "client")

    def plan(self, name: str, route: RouteConfig | None = None) -> Any:
        t = _plan_throttle(self.config, name, route)
        own = route.key if route is not None and route.key in plans_of(self.config)[name].route_throttles else None
        return self._keyed(self.slots.index("keyed", plan_identity(name, own, t)), t.rate, t.burst, "plan")

    def chain(self, route: Any, server: Any) -> Any:
        return LevelChain(route=route, server=server)


class ClusterLimits:
    """Leased buckets in Redis (several hosts)."""

    def __init__(self, config: Config, limiter: Any) -> None:
        self.config = config
        self.limiter = limiter
        t = config.policies.get("throttle")
        self._server = limiter.limit("server", t.rate, t.burst, "server", keyed=False).bucket() \
            if t is not None else None

    def server(self) -> Any:
        return self._server

    def route(self, rc: RouteConfig) -> Any:
        t = cast("ThrottleConfig", rc.policies.get("throttle"))  # route(): only for a throttled route
        name = f"route:{rc.host or ''}{rc.key}" + (f"@{rc.stage}" if rc.stage != "$default" else "")
        if t.key is None:
            return self.limiter.limit(name, t.rate, t.burst, "route", keyed=False).bucket()
        return self.limiter.limit(name, t.rate, t.burst, "client", keyed=True)

    def plan(self, name: str, route: RouteConfig | None = None) -> Any:
        t = _plan_throttle(self.config, name, route)
        own = route.key if route is not None and route.key in plans_of(self.config)[name].route_throttles else None
        return self.limiter.limit(f"plan:{name}:{own}" if own is not None else f"plan:{name}", t.rate, t.burst,
                                  "plan", keyed=True)

    def chain(self, route: Any, server: Any) -> Any:
        return LevelChain(route=route, server=server)


def limits_for(config: Config, shared_table: Any = None, keyed_table: Any = None,
               limiter: Any = None, previous: Any = None,
               slots: SlotMap | None = None) -> LocalLimits | SharedLimits | ClusterLimits:
    """`previous`: the limits of the config being replaced by a reload (local buckets of
    unchanged limits carry over; shared and Redis buckets live outside the process, the
    supervisor's `slots` say where)."""
    if limiter is not None:
        return ClusterLimits(config, limiter)
    if shared_table is not None:
        return SharedLimits(config, shared_table, keyed_table, slots)
    return LocalLimits(config, previous if isinstance(previous, LocalLimits) else None)
