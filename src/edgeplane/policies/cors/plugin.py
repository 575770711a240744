"""The `cors` policy unit: preflights answered by the gateway, headers on actual requests.

Owns the top-level `cors` section (every route), the route-level `cors` (its own policy,
or `false` for none), and `CorsStage` (phase CORS). As AWS HTTP APIs: a preflight never
reaches the upstream, and on a route with CORS the upstream's own CORS response headers
are dropped (`response_headers`). The sans-IO policy is `policy.CorsPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.config.schema import STRINGS
from edgeplane.http.request import header
from edgeplane.plugins import FastStage, Phase, Policy
from edgeplane.policies.cors.policy import CORS_RESPONSE_HEADERS, CorsPolicy

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()  # exact, "*", or "https://*.example.com"
    allow_methods: tuple[str, ...] = ()  # or ("*",)
    allow_headers: tuple[str, ...] = ()  # or ("*",)
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int | None = None  # seconds



_CORS = {
    "type": "object",
    "additionalProperties": False,
    "description": "CORS, as AWS HTTP APIs: preflights are answered by the gateway.",
    "properties": {
        "allow_origins": STRINGS,
        "allow_methods": STRINGS,
        "allow_headers": STRINGS,
        "expose_headers": STRINGS,
        "allow_credentials": {"type": "boolean", "default": False},
        "max_age": {"type": "integer", "minimum": 0, "maximum": 86400},
    },
}

class CorsStage(FastStage):
    """Preflights are answered here without an upstream call; actual requests from an
    allowed origin get the CORS response headers."""

    __slots__ = ("policy",)
    # The router may hand this route a preflight for a path it has no OPTIONS route for
    # (`http.protocol.route`), as AWS HTTP APIs answer every preflight themselves.
    answers_preflights = True

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


def route_cors(config: Config, route: RouteConfig) -> CorsConfig | None:
    """The route's own CORS config, else the server-wide one, unless `cors: false`."""
    own = route.policies.get("cors")
    if own is False:
        return None
    return own or config.policies.get("cors")


class CorsPlugin(Policy):
    name = "cors"
    phase = Phase.CORS
    sections = {"cors": {"$ref": "#/$defs/cors"}}
    route_keys = {"cors": {"anyOf": [{"$ref": "#/$defs/cors"}, {"const": False}]}}
    defs = {"cors": _CORS}

    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return None
        strings = lambda k: tuple(x for x in value.get(k) or () if isinstance(x, str))  # noqa: E731
        max_age = value.get("max_age")
        cfg = CorsConfig(
            allow_origins=strings("allow_origins"), allow_methods=strings("allow_methods"),
            allow_headers=strings("allow_headers"), expose_headers=strings("expose_headers"),
            allow_credentials=value.get("allow_credentials") is True,
            max_age=max_age if isinstance(max_age, int) and not isinstance(max_age, bool) else None,
        )
        try:
            CorsPolicy.from_config(cfg)
        except ValueError as exc:
            ctx.fail(path, str(exc))
        return cfg

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        return False if value is False else self.load_section(key, value, path, ctx)

    def compile(self, route: RouteConfig, ctx: CompileContext) -> CorsStage | None:
        cors = route_cors(ctx.config, route)
        return CorsStage(CorsPolicy.from_config(cors)) if cors is not None else None

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return route_cors(config, route) is not None

    def response_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        return CORS_RESPONSE_HEADERS if route_cors(config, route) is not None else frozenset()


plugin = CorsPlugin()
