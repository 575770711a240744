"""The `jwt` authorizer unit: AWS HTTP API JWT authorizers with cached verification.

Owns `authorizers.NAME` of `type: jwt` (issuer, audiences, algorithms, JWKS file or URL,
HS secrets, leeway, cache), the route's `scopes`/`forward_claims` at compile time, and
`JwtStage` (phase AUTHENTICATION): 401 with `WWW-Authenticate` for a missing or bad
token, 403 `insufficient_scope`. Per gateway it runs a `JwksSource` for each JWKS URL
(fetched at start, refreshed off the request path); per snapshot one cached verifier
per authorizer, shared by every route using it. The sans-IO core is `verify`/`jwks`.

A `jwks.file` that fails the key-set hygiene checks (repeated kid, ROCA key, symmetric and
asymmetric keys mixed without `jwks.allow_mixed_key_types`) is a located load error
(`authorizers.NAME.jwks.file: invalid JWKS: ...`); a `jwks.url` serving such a set is a
failed fetch (`JwksSource` keeps the last good set and logs why).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.config.stages import STAGE_VAR
from edgeplane.http.fields import UnsafeField
from edgeplane.http.request import forwarded, header, identity_header, log_extra
from edgeplane.observability.metrics import ALLOWED, CACHE_HIT, DENIED, ERROR
from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.jwt.jwks import JwksError, parse_jwks
from edgeplane.policies.jwt.jwks_source import JwksSource, split_url
from edgeplane.policies.jwt.verify import (
    UNKNOWN_KID,
    CachedVerifier,
    JwtConfig,
    JwtError,
    JwtVerifier,
    VerificationCache,
    check_scopes,
    extract_bearer,
    www_authenticate,
)

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext, RuntimeContext


@dataclass(frozen=True, slots=True)
class JwtAuthorizerConfig:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    identity_source: str = "$request.header.Authorization"
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    # Accept a key set holding both oct and RSA/EC/OKP keys (refused by default).
    jwks_allow_mixed_key_types: bool = False
    hs_secret_env: str | None = None  # HS* secret from this environment variable
    hs_secret_file: str | None = None  # ... or from this file
    leeway: float = 0.0
    max_token_bytes: int = 8192
    cache_ttl: float = 300.0  # a verified token is cached until min(exp, now + ttl)
    cache_max_entries: int = 10_000
    type: str = "jwt"

    @property
    def header(self) -> bytes:
        return identity_header(self.identity_source)


_JWT_AUTHORIZER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "issuer", "audience"],
    "properties": {
        "type": {"const": "jwt"},
        "identity_source": {"type": "string", "pattern": "^\\$request\\.header\\.[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
                            "default": "$request.header.Authorization"},
        "issuer": {"type": "string", "minLength": 1},
        "audience": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                    "minItems": 1, "maxItems": 50}]},
        "algorithms": {"type": "array", "minItems": 1, "items": {"enum": [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
            "EdDSA", "HS256", "HS384", "HS512"]}},
        "jwks": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"file": {"type": "string"}, "url": {"type": "string"},
                           "refresh": {"$ref": "#/$defs/duration", "default": "300s"},
                           "allow_mixed_key_types": {"type": "boolean", "default": False}},
        },
        "hs_secret": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
        },
        "leeway": {"$ref": "#/$defs/duration", "default": 0},
        "max_token_bytes": {"$ref": "#/$defs/size", "default": 8192},
        "cache": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"ttl": {"$ref": "#/$defs/duration", "default": "300s"},
                           "max_entries": {"type": "integer", "minimum": 0, "default": 10000}},
        },
    },
}

class JwtStage(FastStage):
    """JWT authorizer (AWS HTTP API semantics) with cached verification."""

    __slots__ = ("verifier", "header", "scopes", "forward", "name", "source", "outcomes")

    def __init__(self, verifier: CachedVerifier, cfg: JwtAuthorizerConfig, route: RouteConfig,
                 source: Any = None, outcomes: list[int] | None = None):
        self.verifier = verifier
        self.source = source  # JwksSource for a JWKS URL: told about unknown kids
        self.header = cfg.header
        self.scopes = list(route.scopes)
        self.forward = [(h.encode(), c) for h, c in route.forward_claims]
        self.name = cfg.name
        # [allowed, denied, error, cache hits] (observability.metrics.AuthorizerOutcomes)
        self.outcomes = outcomes if outcomes is not None else [0, 0, 0, 0]

    def __call__(self, proto: HttpProtocol, req: Request) -> bool:
        raw = header(req, self.header)
        outcomes = self.outcomes
        if raw is None:
            outcomes[DENIED] += 1
            self._refuse(proto, req, "missing token")
            return False
        cache = self.verifier.cache
        hits = cache.hits + cache.negative_hits
        try:
            claims = self.verifier.verify(extract_bearer(raw), time.time())
        except JwtError as exc:
            if cache.negative_hits + cache.hits != hits:
                outcomes[CACHE_HIT] += 1
            if exc.kind == UNKNOWN_KID and self.source is not None:
                self.source.unknown_kid()  # maybe the keys rotated: refresh off the request path
                if not self.source.has_keys():
                    outcomes[ERROR] += 1  # no key set fetched yet: the authorizer cannot decide
                    self._refuse(proto, req, exc.description)
                    return False
            outcomes[DENIED] += 1
            self._refuse(proto, req, exc.description)
            return False
        if cache.hits + cache.negative_hits != hits:
            outcomes[CACHE_HIT] += 1
        if self.scopes and not check_scopes(claims, self.scopes):
            outcomes[DENIED] += 1
            extra = ("www-authenticate: " + www_authenticate(
                "insufficient_scope", "the token lacks the scopes of this route",
                " ".join(self.scopes)) + "\r\n").encode()
            req.auth_error = "insufficient_scope"
            proto.send_error(req, 403, "insufficient_scope", extra=extra)
            return False
        # Request.claims is declared `dict | None` (http.request); a Claims reads the same way.
        req.claims = claims
        if self.forward:
            try:
                req.extra_upstream = forwarded(self.forward, claims)
            except UnsafeField as exc:
                # The token is valid, but one of its claims could split the upstream
                # request (a display name with CR LF...): never forwarded, the client's 400.
                logging.getLogger("edgeplane.jwks").warning(
                    "route %r: %s: refused request %s: forwarded claim %s",
                    req.route_key, self.name, req.request_id.decode("latin-1"), exc, extra=log_extra(req))
                outcomes[DENIED] += 1
                proto.send_error(req, 400, f"{self.name}: a forwarded claim cannot be sent upstream")
                return False
        outcomes[ALLOWED] += 1
        return True

    def _refuse(self, proto: HttpProtocol, req: Request, description: str) -> None:
        extra = ("www-authenticate: " + www_authenticate("invalid_token", description)
                 + "\r\n").encode()
        req.auth_error = description
        proto.send_error(req, 401, f"{self.name}: {description}", extra=extra)


def hs_secret(cfg: JwtAuthorizerConfig) -> bytes | None:
    if cfg.hs_secret_env:
        return os.environ.get(cfg.hs_secret_env, "").encode()
    if cfg.hs_secret_file:
        with open(cfg.hs_secret_file, "rb") as fh:
            return fh.read().strip()
    return None


def jwt_config(cfg: JwtAuthorizerConfig) -> JwtConfig:
    """The verifier's settings; raises ValueError when inconsistent (reported at load)."""
    return JwtConfig(issuer=cfg.issuer, audiences=cfg.audiences, algorithms=cfg.algorithms,
                     leeway=cfg.leeway, max_token_bytes=cfg.max_token_bytes,
                     hs_secret=hs_secret(cfg))


def _load(name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> JwtAuthorizerConfig | None:
    ctx.resolve_paths(spec, ("jwks", "file"), ("hs_secret", "file"))  # against the config file's folder
    aud = spec.get("audience")
    audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
    algorithms = tuple(spec.get("algorithms") or ("RS256",))
    jwks = spec["jwks"] if isinstance(spec.get("jwks"), dict) else {}
    secret = spec["hs_secret"] if isinstance(spec.get("hs_secret"), dict) else {}
    hs = [a for a in algorithms if a.startswith("HS")]
    asym = [a for a in algorithms if not a.startswith("HS")]
    if asym and not jwks:
        ctx.fail(path, f"missing 'jwks' (file or url): needed for {', '.join(asym)}")
    if hs and not secret:
        ctx.fail(path, f"missing 'hs_secret' (env or file): needed for {', '.join(hs)}")
    if jwks and ("file" in jwks) == ("url" in jwks):
        ctx.fail(path + ("jwks",), "give exactly one of 'file' and 'url'")
    if isinstance(jwks.get("url"), str) and not STAGE_VAR.search(jwks["url"]):  # else checked per stage
        try:
            split_url(jwks["url"])
        except ValueError as exc:
            ctx.fail(path + ("jwks", "url"), str(exc))
    allow_mixed = jwks.get("allow_mixed_key_types") is True
    if isinstance(jwks.get("file"), str):
        try:
            with open(jwks["file"], "rb") as fh:
                parse_jwks(fh.read(), allow_mixed_key_types=allow_mixed)
        except OSError as exc:
            ctx.fail(path + ("jwks", "file"), f"cannot read: {exc.strerror or exc}")
        except JwksError as exc:
            ctx.fail(path + ("jwks", "file"), f"invalid JWKS: {exc}")
    if secret and ("env" in secret) == ("file" in secret):
        ctx.fail(path + ("hs_secret",), "give exactly one of 'env' and 'file'")
    elif isinstance(secret.get("env"), str) and not os.environ.get(secret["env"]):
        ctx.fail(path + ("hs_secret", "env"), f"environment variable {secret['env']} is not set")
    elif isinstance(secret.get("file"), str) and not os.path.isfile(secret["file"]):
        ctx.fail(path + ("hs_secret", "file"), f"no such file: {secret['file']}")
    cache = spec["cache"] if isinstance(spec.get("cache"), dict) else {}
    issuer = spec.get("issuer")
    if not isinstance(issuer, str) or not audiences:
        return None
    cfg = JwtAuthorizerConfig(
        name=name, issuer=issuer, audiences=audiences, algorithms=algorithms,
        identity_source=spec.get("identity_source", "$request.header.Authorization"),
        jwks_file=jwks.get("file"), jwks_url=jwks.get("url"),
        jwks_refresh=ctx.duration(jwks, "refresh", path + ("jwks",), 300.0),
        jwks_allow_mixed_key_types=allow_mixed,
        hs_secret_env=secret.get("env"), hs_secret_file=secret.get("file"),
        leeway=ctx.duration(spec, "leeway", path, 0.0, low_inclusive=True),
        max_token_bytes=ctx.size(spec, "max_token_bytes", path, 8192, low=256),
        cache_ttl=ctx.duration(cache, "ttl", path + ("cache",), 300.0, low_inclusive=True),
        cache_max_entries=ctx.integer(cache, "max_entries", 10_000),
    )
    if not ctx.errors:
        try:
            jwt_config(cfg)
        except (ValueError, OSError) as exc:
            ctx.fail(path, str(exc))
    return cfg


class JwtPolicy(Policy):
    name = "jwt"
    phase = Phase.AUTHENTICATION
    authorizer_type = "jwt"
    authorizer_schema = _JWT_AUTHORIZER

    def load_authorizer(self, name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return _load(name, spec, path, ctx)

    async def start(self, runtime: RuntimeContext) -> None:
        # JWKS URLs: a first bounded fetch now (a failure starts with no keys: 401s until
        # a background retry succeeds), then refreshed off the request path.
        # On a reload, an unchanged authorizer keeps its source (its key set, its refresh
        # schedule) and its verification cache; the others start anew.
        kept = runtime.carried(self.name, "jwt")
        runtime.state[_CACHES] = runtime.carried(_CACHES, "jwt")
        fresh = {name: JwksSource(name, a.jwks_url, a.jwks_refresh, runtime.loop,
                                  allow_mixed_key_types=a.jwks_allow_mixed_key_types)
                 for name, a in runtime.config.authorizers_of("jwt").items() if a.jwks_url and name not in kept}
        runtime.state[self.name] = {**kept, **fresh}
        await asyncio.gather(*(source.start() for source in fresh.values()))

    async def stop(self, runtime: RuntimeContext) -> None:
        for source in runtime.state.pop(self.name, {}).values():
            await source.close()

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        sources = runtime.state.get(self.name) or {}
        return {"authorizers": {name: s.telemetry() for name, s in sources.items()}}

    def prepare(self, ctx: CompileContext) -> dict[str, CachedVerifier]:
        """One cached verifier per JWT authorizer, shared by every route using it."""
        sources = ctx.runtime.get(self.name) or {}
        out = {}
        for name, cfg in ctx.config.authorizers_of("jwt").items():
            keys: Any = None
            if cfg.jwks_file:
                with open(cfg.jwks_file, "rb") as fh:
                    keys = parse_jwks(fh.read(), allow_mixed_key_types=cfg.jwks_allow_mixed_key_types)
            elif name in sources:
                keys = sources[name].keyset  # a provider: the current key set, per call
            caches: dict[str, Any] = ctx.runtime.get(_CACHES, {})  # start() made it (kept ones in)
            # One cache per issuer and audiences: with stages they may differ per stage, and
            # a token verified for one audience must not be taken from the cache for another.
            by_settings = caches.setdefault(name, {})
            cache = by_settings.get((cfg.issuer, cfg.audiences))
            if cache is None or cfg.jwks_file:  # a key file is read again: its cache starts empty
                cache = by_settings[(cfg.issuer, cfg.audiences)] = VerificationCache(
                    max_entries=cfg.cache_max_entries, ttl=cfg.cache_ttl)
            out[name] = CachedVerifier(JwtVerifier(jwt_config(cfg), keys), cache)
        return out

    def compile(self, route: RouteConfig, ctx: CompileContext) -> JwtStage | None:
        cfg = ctx.authorizer(route, "jwt")
        if cfg is None:
            return None
        sources = ctx.runtime.get(self.name) or {}
        return JwtStage(ctx.state[self.name][route.auth], cfg, route, sources.get(route.auth),
                        ctx.outcome_counts(cfg.name))

    def upstream_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        return frozenset(h.encode() for h, _ in route.forward_claims)


_CACHES = "jwt:caches"  # runtime.state key: verification caches by authorizer name, then settings

plugin = JwtPolicy()
