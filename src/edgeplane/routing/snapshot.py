"""Compile a `Config` into the immutable snapshot the data path reads.

Owns the per-route compiled chain: `CompiledRoute` holds the route key, a tuple of
synchronous stages (`stage(proto, req) -> bool`: True continues, False means the stage
answered) and the integration object whose `handle(proto, req)` produces the response.
Nothing in a chain is built per request. A reload builds a new `Snapshot` and swaps one
reference; in-flight requests keep the route objects they matched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from edgeplane.policies.cors.policy import CORS_RESPONSE_HEADERS
from edgeplane.upstream.proxy import HttpIntegration
from edgeplane.websocket.proxy import WsUpgradeExchange, relay_settings
from edgeplane.routing.chain import PlanState, build_stages, build_verifiers, route_cors
from edgeplane.policies.throttle.stores import LocalLimits
from edgeplane.routing.router import Router, compile_routes

if TYPE_CHECKING:
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.upstream.pool import Upstream
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request


class MockIntegration:
    """Answers from the gateway itself with a fixed status, headers and body."""

    __slots__ = ("status", "body", "content_type", "extra")

    def __init__(self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...]):
        self.status = status
        self.body = body
        self.content_type = content_type.encode()
        self.extra = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in headers)

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        proto.send_local(req, self.status, self.body, self.content_type, self.extra)


class FunctionIntegration:
    """Answers with a Python callable: `fn(req) -> (status, body, content_type)`.

    Used for the admin API; the callable runs on the event loop, so it must be quick."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Request], tuple[int, bytes, bytes]]):
        self.fn = fn

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        status, body, content_type = self.fn(req)
        proto.send_local(req, status, body, content_type)


class CompiledRoute:
    __slots__ = ("key", "config", "stages", "integration")

    def __init__(self, config: RouteConfig | None, key: str, stages: tuple, integration: Any):
        self.config = config
        self.key = key
        self.stages = stages
        self.integration = integration


class Snapshot:
    __slots__ = ("config", "router", "routes", "websocket_apis")

    def __init__(self, config: Config | None, router: Router, routes: list[CompiledRoute],
                 websocket_apis: dict[bytes, Any] | None = None):
        self.config = config
        self.router = router
        self.routes = routes
        # request path -> the WebSocket API handler (`ws_api`): checked before routing
        self.websocket_apis = websocket_apis or {}


def compile_route(config: Config, rc: RouteConfig, upstreams: dict[str, Upstream],
                  verifiers: dict[str, Any], auth_sources: dict[str, Any],
                  limits: Any = None, plans: Any = None) -> CompiledRoute:
    integ = rc.integration
    if integ.type == "mock":
        handler: Any = MockIntegration(integ.status, integ.body, integ.content_type, integ.headers)
    else:
        handler = HttpIntegration(
            upstreams[integ.upstream], integ.path, integ.timeout, integ.preserve_host,
            claim_headers=gateway_set_headers(config, rc),
            gateway_response_headers=CORS_RESPONSE_HEADERS if route_cors(config, rc) else frozenset(),
            websocket=relay_settings(rc.websocket or config.websocket, config.limits.send_timeout),
            websocket_exchange=WsUpgradeExchange,
        )
    return CompiledRoute(rc, rc.key, build_stages(config, rc, verifiers, auth_sources, limits, plans),
                         handler)


def gateway_set_headers(config: Config, rc: RouteConfig) -> frozenset[bytes]:
    """Upstream headers the route's authorizer sets: a client may not send them."""
    names = {h.encode() for h, _ in rc.forward_claims}
    auth = config.authorizers.get(rc.auth) if rc.auth else None
    if auth is not None and auth.type == "http":
        names |= {h.encode() for h, _ in auth.forward_context}
    return frozenset(names)


def build_snapshot(config: Config, upstreams: dict[str, Upstream],
                   auth_sources: dict[str, Any] | None = None, limits: Any = None,
                   quota_counter: Any = None, websocket_apis: dict[bytes, Any] | None = None) -> Snapshot:
    """`limits` (`limits.limits_for`) says where throttle buckets live; in-process by default.
    One server-wide bucket is shared by every route (AWS's account level)."""
    auth_sources = auth_sources or {}
    verifiers = build_verifiers(config, auth_sources)
    limits = limits if limits is not None else LocalLimits(config)
    plans = PlanState(config, quota_counter, limits) if config.usage_plans else None
    routes = [compile_route(config, rc, upstreams, verifiers, auth_sources, limits, plans)
              for rc in config.routes]
    router = compile_routes([(c.config, c) for c in routes])
    return Snapshot(config, router, routes, websocket_apis)
