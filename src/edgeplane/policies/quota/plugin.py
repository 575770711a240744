"""The `usage_plans` unit: AWS usage plans' quotas (and the plans' per-key throttles).

Owns the top-level `usage_plans` section (each plan: a per-key `throttle`, per-route
`routes` throttles, a `quota` of requests per DAY/WEEK/MONTH), its checks (a plan's
route must exist and be guarded by an API-key authorizer), and `QuotaStage` (phase
TRAFFIC, order 20): requests per period per API key, counted in memory on the request
path and persisted off it (`store.QuotaStore`, or Redis in cluster mode); exhausted is
429 `Limit Exceeded`. The plans' throttles are enforced by the throttle unit. The
counter comes from the gateway as the compile resource "quota_counter".
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.quota.store import QuotaPeriod
from edgeplane.policies.throttle.model import _THROTTLE, ThrottleConfig, load_throttle

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext, Path
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext

QUOTA_BODY = b'{"message":"Limit Exceeded"}'

_USAGE_PLANS = {
    "type": "object",
    "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"},
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "throttle": {"$ref": "#/$defs/throttle"},
            "routes": {
                "type": "object",
                "description": "Route key (as in `routes`) -> the plan's per-key throttle "
                               "on that route, replacing `throttle` there (AWS method throttling).",
                "additionalProperties": {"$ref": "#/$defs/throttle"},
            },
            "quota": {
                "type": "object",
                "additionalProperties": False,
                "required": ["limit", "period"],
                "properties": {
                    "limit": {"type": "integer", "minimum": 1},
                    "period": {"enum": ["DAY", "WEEK", "MONTH"]},
                    "offset": {"type": "integer", "minimum": 0, "default": 0},
                },
            },
        },
    },
}


@dataclass(frozen=True, slots=True)
class UsagePlanConfig:
    """API keys attach to a plan (key file `plan:`): a per-key throttle and a quota."""

    name: str
    throttle: ThrottleConfig | None = None  # one bucket per API key
    # AWS method throttling: route key -> the plan's per-key bucket on that route instead
    route_throttles: dict[str, ThrottleConfig] = field(default_factory=dict)
    quota_limit: int | None = None  # requests per period per API key
    quota_period: str = "DAY"  # DAY | WEEK | MONTH
    quota_offset: int = 0  # days into the period (WEEK: 0 = Sunday, as AWS)


class QuotaStage(FastStage):
    """Usage-plan quotas: requests per DAY/WEEK/MONTH per API key, counted in memory on
    the request path and persisted by `quota.QuotaStore` off it. 429 Limit Exceeded."""

    __slots__ = ("counter", "plans")

    def __init__(self, counter: Any, plans: dict[str, tuple[int, Any]]):
        self.counter = counter
        self.plans = plans  # plan name -> (limit, QuotaPeriod)

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        api_key = req.api_key
        if api_key is None or not api_key.plan:
            return True
        quota = self.plans.get(api_key.plan)
        if quota is None:
            return True
        limit, period = quota
        if self.counter.try_consume(api_key.id, limit, time.time(), period):
            return True
        req.error = f"quota of plan {api_key.plan!r} exhausted for key {api_key.id!r}"
        proto.ctx.count_error("429")
        proto.ctx.count_refusal("quota", api_key.plan)
        proto.send_local(req, 429, QUOTA_BODY)
        return False


def _load_plans(section: Any, ctx: LoadContext) -> dict[str, UsagePlanConfig]:
    out: dict[str, UsagePlanConfig] = {}
    if not isinstance(section, dict):
        return out
    for name, spec in section.items():
        if not isinstance(spec, dict):
            continue
        path: Path = ("usage_plans", name)
        throttle = load_throttle(spec.get("throttle"), path + ("throttle",), ctx, route_level=True)
        per_route = spec["routes"] if isinstance(spec.get("routes"), dict) else {}
        route_throttles = {}
        for key, t_spec in per_route.items():
            t = load_throttle(t_spec, path + ("routes", key), ctx, route_level=True)
            if t is not None and t.key is not None:
                ctx.fail(path + ("routes", key, "key"), "a usage plan's throttle is per API key already")
            if t is not None:
                route_throttles[key] = t
        quota = spec["quota"] if isinstance(spec.get("quota"), dict) else {}
        period, offset = quota.get("period", "DAY"), quota.get("offset", 0)
        try:
            QuotaPeriod(period, offset)
        except (ValueError, TypeError) as exc:
            ctx.fail(path + ("quota",), str(exc))
        limit = quota.get("limit")
        out[name] = UsagePlanConfig(
            name=name, throttle=throttle, route_throttles=route_throttles,
            quota_limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
            quota_period=period if isinstance(period, str) else "DAY",
            quota_offset=offset if isinstance(offset, int) else 0)
    return out


def _check_plan_routes(ctx: LoadContext, plans: dict[str, UsagePlanConfig], routes: tuple[RouteConfig, ...]) -> None:
    """A plan's per-route throttle must name a route guarded by an API-key authorizer
    (else no request could ever carry the plan there)."""
    by_key = {r.key: r for r in routes}
    for name, plan in plans.items():
        for key in plan.route_throttles:
            path = ("usage_plans", name, "routes", key)
            route = by_key.get(key)
            if route is None:
                close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)
                ctx.fail(path, "no route has this key" + (f"; did you mean {close[0]!r}?" if close else ""))
            elif route.auth is None or ctx.authorizer_types.get(route.auth) != "api_key":
                ctx.fail(path, "the route has no api_key authorizer, so no request there carries a plan")




class UsagePlansPolicy(Policy):
    name = "usage_plans"
    phase = Phase.TRAFFIC
    order = 20
    sections = {"usage_plans": _USAGE_PLANS}
    defs = {"throttle": _THROTTLE}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return _load_plans(value, ctx)

    def check(self, config: Config, ctx: LoadContext) -> None:
        _check_plan_routes(ctx, config.policies.get("usage_plans") or {}, config.routes)

    def applies(self, route: RouteConfig, config: Config) -> bool:
        plans = config.policies.get("usage_plans") or {}
        auth = config.authorizers.get(route.auth) if route.auth else None
        return auth is not None and auth.type == "api_key" and any(
            p.quota_limit is not None for p in plans.values())

    def prepare(self, ctx: CompileContext) -> dict[str, tuple[int, QuotaPeriod]]:
        plans = ctx.config.policies.get("usage_plans") or {}
        return {n: (p.quota_limit, QuotaPeriod(p.quota_period, p.quota_offset))
                for n, p in plans.items() if p.quota_limit is not None}

    def compile(self, route: RouteConfig, ctx: CompileContext) -> QuotaStage | None:
        counter = ctx.resources.get("quota_counter")
        quotas = ctx.state.get(self.name)
        if counter is None or not quotas or ctx.authorizer(route, "api_key") is None:
            return None
        return QuotaStage(counter, quotas)


plugin = UsagePlansPolicy()
