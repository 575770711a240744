"""Edge-policy stages of a route's compiled chain: IP rules, CORS, JWT authorizer.

Owns turning the policy config of a route into the tuple of stage callables that
`server.HttpProtocol._dispatch` runs in order (DESIGN.md: ip filter -> cors preflight
-> authorizer). A stage is `stage(proto, req) -> bool`: True continues the chain, False
means the stage answered the request itself (a local reply). Every stage here is
synchronous: the policy cores (`iprules`, `cors`, `jwt`) are sans-IO and cached.

Invariants:
- A refused request never reaches the integration: the stage answers and returns False.
- Gateway answers use the AWS messages (403 Forbidden, 401 Unauthorized) and are
  counted and logged once through `proto.send_error`.
- Stage objects are built once per snapshot; nothing here allocates per request beyond
  the values it hands to the request (client IP, claims, header lines).
"""

from __future__ import annotations

import os
import time

import orjson
from typing import TYPE_CHECKING, Any, Callable

from edgeplane.http.request import forwarded, header, header_all
from edgeplane.policies.api_keys.store import KeyStore, load_key_file
from edgeplane.policies.cors.policy import CorsPolicy
from edgeplane.policies.ip_rules.rules import IpRules, TrustedProxies
from edgeplane.policies.throttle.buckets import (UNAVAILABLE, ratelimit_headers,
                       retry_after_header)
from edgeplane.policies.jwt.jwks import parse_jwks
from edgeplane.policies.jwt.verify import (UNKNOWN_KID, CachedVerifier, JwtConfig, JwtError, JwtVerifier,
                  VerificationCache, check_scopes, extract_bearer, www_authenticate)

if TYPE_CHECKING:
    from edgeplane.config.model import ApiKeyAuthorizerConfig, Config, JwtAuthorizerConfig, RouteConfig, ThrottleConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

Stage = Callable[["HttpProtocol", "Request"], bool]


def route_cors(config: Config, route: RouteConfig) -> Any:
    """The route's own CORS config, else the server-wide one, unless `cors: false`."""
    return route.cors or (None if route.cors_off else config.cors)


class IpStage:
    """Client IP (X-Forwarded-For believed only from trusted proxies), then the IP rules
    (server-wide and route rules combined: a request must pass both); denied is 403."""

    __slots__ = ("rules", "trusted")

    def __init__(self, rules: IpRules, trusted: TrustedProxies | None):
        self.rules = rules
        self.trusted = trusted

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        ip = req.client_ip
        if ip is None:
            ip = proto.peer_ip
            if self.trusted is not None:
                ip = self.trusted.client_ip(ip, header_all(req, b"x-forwarded-for"))
            req.client_ip = ip
        if not self.rules.check(ip):
            proto.send_error(req, 403, f"client {ip} denied by IP rules")
            return False
        return True


class CorsStage:
    """Preflights are answered here without an upstream call; actual requests from an
    allowed origin get the CORS response headers."""

    __slots__ = ("policy",)

    def __init__(self, policy: CorsPolicy):
        self.policy = policy

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        policy = self.policy
        origin = header(req, b"origin")
        if origin is not None and policy.is_preflight(req.method, req.headers):
            status, headers = policy.preflight(req.headers)
            if status >= 400:
                proto.send_error(req, status, "CORS preflight refused")
            else:
                proto.send_local(req, status, b"", extra=headers)
            return False
        # Also without an Origin: the `vary: origin` line keeps shared caches correct.
        req.extra_response += policy.response_headers(origin)
        return True


class JwtStage:
    """JWT authorizer (AWS HTTP API semantics) with cached verification."""

    __slots__ = ("verifier", "header", "scopes", "forward", "name", "source")

    def __init__(self, verifier: CachedVerifier, cfg: JwtAuthorizerConfig, route: RouteConfig,
                 source: Any = None):
        self.verifier = verifier
        self.source = source  # JwksSource for a JWKS URL: told about unknown kids
        self.header = cfg.header
        self.scopes = list(route.scopes)
        self.forward = [(h.encode(), c) for h, c in route.forward_claims]
        self.name = cfg.name

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        raw = header(req, self.header)
        if raw is None:
            self._refuse(proto, req, "missing token")
            return False
        try:
            claims = self.verifier.verify(extract_bearer(raw), time.time())
        except JwtError as exc:
            if exc.kind == UNKNOWN_KID and self.source is not None:
                self.source.unknown_kid()  # maybe the keys rotated: refresh off the request path
            self._refuse(proto, req, exc.description)
            return False
        if self.scopes and not check_scopes(claims, self.scopes):
            extra = ("www-authenticate: " + www_authenticate(
                "insufficient_scope", "the token lacks the scopes of this route",
                " ".join(self.scopes)) + "\r\n").encode()
            proto.send_error(req, 403, "insufficient_scope", extra=extra)
            return False
        req.claims = claims
        if self.forward:
            req.extra_upstream = forwarded(self.forward, claims)
        return True

    def _refuse(self, proto: HttpProtocol, req: Request, description: str) -> None:
        extra = ("www-authenticate: " + www_authenticate("invalid_token", description)
                 + "\r\n").encode()
        proto.send_error(req, 401, f"{self.name}: {description}", extra=extra)


class ApiKeyStage:
    """API key authorizer: the key from its header (X-API-Key by default) must be an
    enabled key of the key file; missing or invalid is 403 Forbidden, as AWS answers."""

    __slots__ = ("store", "header", "name")

    def __init__(self, store: KeyStore, cfg: ApiKeyAuthorizerConfig):
        self.store = store
        self.header = cfg.header
        self.name = cfg.name

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        presented = header(req, self.header)
        key = self.store.lookup(presented) if presented is not None else None
        if key is None:
            why = "missing API key" if presented is None else "invalid API key"
            proto.send_error(req, 403, f"{self.name}: {why}")
            return False
        req.api_key = key
        return True


class ThrottleStage:
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
        self.key_kind = self.key_detail = None
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


class QuotaStage:
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
        proto.send_local(req, 429, QUOTA_BODY)
        return False


class PlanState:
    """Per snapshot: each usage plan's per-key throttle level and quota, and the quota counter."""

    def __init__(self, config: Config, quota_counter: Any, limits: Any) -> None:
        from edgeplane.policies.quota.store import QuotaPeriod

        plans = config.usage_plans
        self.buckets = {n: limits.plan(n) for n, p in plans.items() if p.throttle is not None}
        # AWS method throttling: a plan's own bucket on the routes it names
        self.route_buckets = {(n, key): limits.plan(n, route)
                              for n, p in plans.items() for route in config.routes
                              for key in p.route_throttles if key == route.key}
        self.quotas = {n: (p.quota_limit, QuotaPeriod(p.quota_period, p.quota_offset))
                       for n, p in plans.items() if p.quota_limit is not None}
        self.counter = quota_counter

    def levels_for(self, route: RouteConfig) -> dict[str, Any]:
        """Plan name -> the per-API-key throttle level the plan has on `route`."""
        levels = dict(self.buckets)
        for (name, key), limit in self.route_buckets.items():
            if key == route.key:
                levels[name] = limit
        return levels


QUOTA_BODY = b'{"message":"Limit Exceeded"}'


def _key_expression(expr: str) -> tuple[str, Any]:
    if expr == "$context.identity.sourceIp":
        return "ip", None
    if expr == "$context.identity.apiKeyId":
        return "apikey", None
    if expr.startswith("$request.header."):
        return "header", expr[16:].lower().encode()
    return "claim", expr[len("$context.authorizer.claims."):]


def hs_secret(cfg: JwtAuthorizerConfig) -> bytes | None:
    if cfg.hs_secret_env:
        return os.environ.get(cfg.hs_secret_env, "").encode()
    if cfg.hs_secret_file:
        with open(cfg.hs_secret_file, "rb") as fh:
            return fh.read().strip()
    return None


def build_verifiers(config: Config, auth_sources: dict[str, Any]) -> dict[str, CachedVerifier | KeyStore]:
    """Per authorizer, shared by every route that uses it: a cached JWT verifier (keys
    from the JWKS file, read here, or the authorizer's `JwksSource`) or an API key store."""
    out = {}
    for name, cfg in config.authorizers.items():
        if cfg.type == "api_key":
            out[name] = load_key_file(cfg.keys_file)
            continue
        if cfg.type != "jwt":
            continue
        keys: Any = None
        if cfg.jwks_file:
            with open(cfg.jwks_file, "rb") as fh:
                keys = parse_jwks(fh.read())
        elif name in auth_sources:
            keys = auth_sources[name].keyset  # a provider: the current key set, per call
        verifier = JwtVerifier(jwt_config(cfg), keys)
        cache = VerificationCache(max_entries=cfg.cache_max_entries, ttl=cfg.cache_ttl)
        out[name] = CachedVerifier(verifier, cache)
    return out


def jwt_config(cfg: JwtAuthorizerConfig) -> JwtConfig:
    """The verifier's settings; raises ValueError when inconsistent (config.py reports it)."""
    return JwtConfig(issuer=cfg.issuer, audiences=cfg.audiences, algorithms=cfg.algorithms,
                     leeway=cfg.leeway, max_token_bytes=cfg.max_token_bytes,
                     hs_secret=hs_secret(cfg))


def build_stages(config: Config, route: RouteConfig, verifiers: dict[str, CachedVerifier],
                 auth_sources: dict[str, Any], limits: Any = None,
                 plans: PlanState | None = None) -> tuple[Stage, ...]:
    stages: list[Stage] = []
    rules = [IpRules(r.allow, r.deny) for r in (config.ip_rules, route.ip_rules) if r]
    if rules:
        combined = rules[0] if len(rules) == 1 else rules[0] & rules[1]
        trusted = TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None
        stages.append(IpStage(combined, trusted))
    cors = route_cors(config, route)
    if cors is not None:
        stages.append(CorsStage(CorsPolicy.from_config(cors)))
    if route.auth is not None:
        cfg = config.authorizers[route.auth]
        if cfg.type == "api_key":
            stages.append(ApiKeyStage(verifiers[route.auth], cfg))
        elif cfg.type == "http":
            from edgeplane.policies.http_authorizer.client import HttpAuthorizerStage  # imports this module

            stages.append(HttpAuthorizerStage(auth_sources[route.auth]))
        else:
            stages.append(JwtStage(verifiers[route.auth], cfg, route, auth_sources.get(route.auth)))
    keyed = route.auth is not None and config.authorizers[route.auth].type == "api_key"
    plan_levels = plans.levels_for(route) if plans is not None and keyed else None
    server_level = limits.server() if limits is not None else None
    if route.throttle is not None or server_level is not None or plan_levels:
        headers = config.throttle.headers if config.throttle is not None else True
        route_level = limits.route(route) if route.throttle is not None else None
        chain = limits.chain(route_level, server_level)
        stages.append(ThrottleStage(chain, route.throttle, route_level, headers, plan_levels))
    if keyed and plans is not None and plans.quotas and plans.counter is not None:
        stages.append(QuotaStage(plans.counter, plans.quotas))
    return tuple(stages)
