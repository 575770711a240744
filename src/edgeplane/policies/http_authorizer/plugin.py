"""The `http` authorizer unit: a custom REQUEST authorizer called over HTTP.

Owns `authorizers.NAME` of `type: http` (URL, identity sources, result TTL, timeout,
`forward_context`), like an AWS Lambda REQUEST authorizer with payload 2.0, and compiles
`client.HttpAuthorizerStage` (phase AUTHENTICATION) for the routes that use one. Per
gateway, one `HttpAuthorizerClient` per authorizer (pool and result cache); its
`forward_context` headers are the gateway's on those routes (client copies stripped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.config.stages import STAGE_VAR
from edgeplane.plugins import Phase, Policy
from edgeplane.policies.http_authorizer.client import HttpAuthorizerClient, HttpAuthorizerStage
from edgeplane.policies.jwt.jwks_source import split_url

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.plugins import CompileContext, RuntimeContext


@dataclass(frozen=True, slots=True)
class HttpAuthorizerConfig:
    """A custom authorizer, like an AWS Lambda REQUEST authorizer (payload 2.0)."""

    name: str
    url: str
    identity_source: tuple[str, ...] = ("$request.header.Authorization",)
    result_ttl: float = 300.0  # 0 = no caching; at most 3600 s
    timeout: float = 10.0
    forward_context: tuple[tuple[str, str], ...] = ()  # (header name, context key)
    cache_max_entries: int = 10_000
    type: str = "http"


_IDENTITY = {"type": "string",
             "pattern": "^\\$(request\\.(header|querystring)\\.[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                        "|context\\.(routeKey|identity\\.sourceIp))$"}

_HTTP_AUTHORIZER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "url"],
    "properties": {
        "type": {"const": "http"},
        "url": {"type": "string", "description": "http(s) URL the payload (version 2.0) is POSTed to."},
        "identity_source": {"anyOf": [_IDENTITY, {"type": "array", "items": _IDENTITY, "minItems": 1}],
                            "default": ["$request.header.Authorization"]},
        "result_ttl": {"$ref": "#/$defs/duration", "default": "300s"},
        "timeout": {"$ref": "#/$defs/duration", "default": "10s"},
        "forward_context": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "Upstream header name -> key of the authorizer's context."},
        "cache_max_entries": {"type": "integer", "minimum": 1, "default": 10000},
    },
}
def _load(name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> HttpAuthorizerConfig | None:
    url = spec.get("url")
    if not isinstance(url, str):
        return None
    try:
        if not STAGE_VAR.search(url):  # else checked per stage (`config.stages.check`)
            split_url(url)
    except ValueError as exc:
        ctx.fail(path + ("url",), str(exc))
    sources = spec.get("identity_source", ["$request.header.Authorization"])
    sources = (sources,) if isinstance(sources, str) else tuple(s for s in sources if isinstance(s, str))
    ttl = ctx.duration(spec, "result_ttl", path, 300.0, low_inclusive=True)
    if ttl > 3600:
        ctx.fail(path + ("result_ttl",), "at most 3600s (AWS's maximum)")
    forward = spec.get("forward_context") or {}
    return HttpAuthorizerConfig(
        name=name, url=url, identity_source=sources, result_ttl=ttl,
        timeout=ctx.duration(spec, "timeout", path, 10.0),
        forward_context=tuple((k.lower(), v) for k, v in forward.items()
                              if isinstance(k, str) and isinstance(v, str)),
        cache_max_entries=ctx.integer(spec, "cache_max_entries", 10_000))


class HttpAuthorizerPolicy(Policy):
    name = "http_authorizer"
    phase = Phase.AUTHENTICATION
    authorizer_type = "http"
    authorizer_schema = _HTTP_AUTHORIZER

    def load_authorizer(self, name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return _load(name, spec, path, ctx)

    async def start(self, runtime: RuntimeContext) -> None:
        kept = runtime.carried(self.name, "http")  # a reload: unchanged ones keep their cache
        runtime.state[self.name] = {name: kept.get(name) or HttpAuthorizerClient(a, runtime.loop)
                                    for name, a in runtime.config.authorizers_of("http").items()}

    async def stop(self, runtime: RuntimeContext) -> None:
        for client in runtime.state.pop(self.name, {}).values():
            await client.close()

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        clients = runtime.state.get(self.name) or {}
        return {"authorizers": {name: c.telemetry() for name, c in clients.items()}}

    def compile(self, route: RouteConfig, ctx: CompileContext) -> HttpAuthorizerStage | None:
        cfg = ctx.authorizer(route, self.authorizer_type)
        if cfg is None:
            return None
        return HttpAuthorizerStage(ctx.runtime[self.name][cfg.name], ctx.outcome_counts(cfg.name))

    def upstream_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        cfg = config.authorizers.get(route.auth) if route.auth else None
        if cfg is None or cfg.type != self.authorizer_type:
            return frozenset()
        return frozenset(h.encode() for h, _ in cfg.forward_context)


plugin = HttpAuthorizerPolicy()
