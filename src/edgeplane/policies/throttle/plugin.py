"""The `throttle` policy unit: token buckets in AWS order, checked before any is taken.

Owns the top-level `throttle` (the server-wide bucket, AWS's account level, and whether
RateLimit headers are sent), the route-level `throttle` (one bucket, or per client with
`key`), and `ThrottleStage` (phase TRAFFIC, order 10), which also checks the caller's
usage-plan bucket (`usage_plans`, loaded by the quota unit). 429 Too Many Requests with
Retry-After when a level is empty; 503 when its store is down and fails closed.

Where buckets live is the gateway's choice (`stores`: in process, shared memory across
workers, Redis across hosts), passed in as the compile resource "limits"; without it
(a WebSocket API's `$connect`) no throttle stage is compiled.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from edgeplane.http.request import header
from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.throttle.buckets import UNAVAILABLE, ratelimit_headers, retry_after_header
from edgeplane.policies.throttle.model import _THROTTLE, ThrottleConfig, load_throttle

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext


class ThrottleStage(FastStage):
    """Token buckets in AWS order (usage plan, route or per-client, server-wide); checks
    every level before taking from any. 429 Too Many Requests with Retry-After when a
    level is empty (503 when its store is down and fails closed); RateLimit headers on
    every answer when enabled. No locks, no awaits: the store behind the levels is
    `limits`'s choice (in process, shared memory or Redis leases)."""

    __slots__ = ("chain", "key_kind", "key_detail", "refuse_unresolved", "headers", "route_level", "plans")

    def __init__(self, chain: Any, route: ThrottleConfig | None, route_level: Any, headers: bool,
                 plans: dict[str, Any] | None = None):
        self.chain = chain
        self.route_level = route_level  # swept when it holds per-client buckets
        self.plans = plans or {}  # usage plan name -> per-API-key limit
        self.key_kind: str | None = None
        self.key_detail: Any = None  # bytes for "header", the claim name for "claim"
        self.refuse_unresolved = False
        if route is not None and route.key is not None:
            self.key_kind, self.key_detail = _key_expression(route.key)
            self.refuse_unresolved = route.unresolved == "refuse"
        self.headers = headers

    def _client_key(self, proto: HttpProtocol, req: Request) -> str | bytes | None:
        kind = self.key_kind
        if kind == "ip":
            return req.client_ip or proto.peer_ip
        if kind == "header":
            return header(req, self.key_detail)
        if kind == "apikey":
            return req.api_key.id if req.api_key is not None else None
        value = req.claims.get(self.key_detail) if req.claims is not None else None
        return value if isinstance(value, str) else None

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        key = None
        if self.key_kind is not None:
            key = self._client_key(proto, req)
            if key is None and self.refuse_unresolved:
                proto.send_error(req, 403, "throttle: the client key cannot be resolved")
                return False
        api_key = req.api_key
        plan = self.plans.get(api_key.plan) if api_key is not None and api_key.plan else None
        if plan is not None:
            result = self.chain.check(time.monotonic(), plan=plan, plan_key=api_key.id, route_key=key)
        else:
            result = self.chain.check(time.monotonic(), route_key=key)
        if not result.allowed:
            if result.retry_after == UNAVAILABLE:
                proto.send_error(req, 503, f"throttle store unavailable ({result.policy}); failing closed",
                                 extra=retry_after_header(1.0))
                return False
            extra = ratelimit_headers(result) if self.headers else b""
            proto.ctx.count_refusal("throttle", result.policy)
            proto.send_error(req, 429, f"throttled ({result.policy})",
                             extra=retry_after_header(result.retry_after) + extra)
            return False
        if self.headers:
            extra = ratelimit_headers(result)
            if extra:
                req.extra_response += extra
        return True

    def sweep(self, now: float) -> None:
        for level in (self.route_level, *self.plans.values()):
            sweep = getattr(level, "sweep", None)
            if sweep is not None:
                sweep(now, limit=1000)


class PlanState:
    """Per snapshot: each usage plan's per-key throttle level (on every route, or per route)."""

    def __init__(self, config: Config, limits: Any) -> None:
        plans = config.policies.get("usage_plans") or {}
        self.buckets = {n: limits.plan(n) for n, p in plans.items() if p.throttle is not None}
        # AWS method throttling: a plan's own bucket on the routes it names
        self.route_buckets = {(n, key): limits.plan(n, route)
                              for n, p in plans.items() for route in config.routes
                              for key in p.route_throttles if key == route.key}

    def levels_for(self, route: RouteConfig) -> dict[str, Any]:
        """Plan name -> the per-API-key throttle level the plan has on `route`."""
        levels = dict(self.buckets)
        for (name, key), limit in self.route_buckets.items():
            if key == route.key:
                levels[name] = limit
        return levels


def _key_expression(expr: str) -> tuple[str, Any]:
    if expr == "$context.identity.sourceIp":
        return "ip", None
    if expr == "$context.identity.apiKeyId":
        return "apikey", None
    if expr.startswith("$request.header."):
        return "header", expr[16:].lower().encode()
    return "claim", expr[len("$context.authorizer.claims."):]


def _check_throttle_keys(ctx: LoadContext, routes: tuple[RouteConfig, ...]) -> None:
    """Per-client keys that can never resolve on their route are refused, not left to
    fall silently into the shared bucket."""
    for r in routes:
        throttle = r.policies.get("throttle")
        key = throttle.key if throttle is not None else None
        kind = ctx.authorizer_types.get(r.auth) if r.auth else None
        if key == "$context.identity.apiKeyId" and kind != "api_key":
            ctx.fail(("routes", r.index, "throttle", "key"),
                   f"{key} never resolves here: the route has no api_key authorizer")
        elif key is not None and key.startswith("$context.authorizer.claims.") and kind != "jwt":
            ctx.fail(("routes", r.index, "throttle", "key"),
                   f"{key} never resolves here: claims come from a jwt authorizer and the route has none")



class ThrottlePolicy(Policy):
    name = "throttle"
    phase = Phase.TRAFFIC
    order = 10
    sections = {"throttle": {"$ref": "#/$defs/throttle"}}
    route_keys = {"throttle": {"$ref": "#/$defs/throttle"}}
    defs = {"throttle": _THROTTLE}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return load_throttle(value, path, ctx, route_level=False)

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return load_throttle(value, path, ctx, route_level=True)

    def check(self, config: Config, ctx: LoadContext) -> None:
        _check_throttle_keys(ctx, config.routes)

    def applies(self, route: RouteConfig, config: Config) -> bool:
        if "throttle" in route.policies or "throttle" in config.policies:
            return True
        auth = config.authorizers.get(route.auth) if route.auth else None
        plans = config.policies.get("usage_plans") or {}
        return auth is not None and auth.type == "api_key" and any(
            p.throttle is not None or route.key in p.route_throttles for p in plans.values())

    def prepare(self, ctx: CompileContext) -> PlanState | None:
        limits = ctx.resources.get("limits")
        if limits is None or not ctx.config.policies.get("usage_plans"):
            return None
        return PlanState(ctx.config, limits)

    def compile(self, route: RouteConfig, ctx: CompileContext) -> ThrottleStage | None:
        limits = ctx.resources.get("limits")
        if limits is None:
            return None
        config = ctx.config
        plans = ctx.state.get(self.name)
        keyed = ctx.authorizer(route, "api_key") is not None
        plan_levels = plans.levels_for(route) if plans is not None and keyed else None
        server_level = limits.server()
        throttle = route.policies.get("throttle")
        if throttle is None and server_level is None and not plan_levels:
            return None
        top = config.policies.get("throttle")
        headers = top.headers if top is not None else True
        route_level = limits.route(route) if throttle is not None else None
        chain = limits.chain(route_level, server_level)
        return ThrottleStage(chain, throttle, route_level, headers, plan_levels)


plugin = ThrottlePolicy()
