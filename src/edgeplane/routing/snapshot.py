"""Compile a `Config` into the immutable snapshot the data path reads.

Owns the per-route compiled chain: `CompiledRoute` holds the route key, a tuple of
synchronous stages (`stage(proto, req) -> bool`: True continues, False means the stage
answered) and the integration object whose `handle(proto, req)` produces the response.
Nothing in a chain is built per request. A reload builds a new `Snapshot` and swaps one
reference; in-flight requests keep the route objects they matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgeplane.config.stages import views
from edgeplane.http.paths import STRICT
from edgeplane.plugins.base import CompileContext
from edgeplane.policies.throttle.stores import LocalLimits
from edgeplane.routing.canary import Canary
from edgeplane.routing.chain import compile_chain
from edgeplane.routing.router import Router, compile_routes
from edgeplane.routing.stages import StageSelector

if TYPE_CHECKING:
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins.registry import Registry
    from edgeplane.upstream.cluster import Upstream


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
    """A matched route's compiled chain: stages in order, the integration, response hooks
    (already in reverse order) and log hooks. Empty hook tuples cost nothing."""

    __slots__ = ("key", "config", "stages", "integration", "response_hooks", "log_hooks", "metrics")

    def __init__(self, config: RouteConfig | None, key: str, stages: tuple[Any, ...], integration: Any,
                 response_hooks: tuple[Any, ...] = (), log_hooks: tuple[Any, ...] = ()):
        self.config = config
        self.key = key
        self.stages = stages
        self.integration = integration
        self.response_hooks = response_hooks
        self.log_hooks = log_hooks
        # The route key's request counters (`observability.metrics.RouteMetrics`), set by
        # the gateway after compiling; None: counted as unmatched.
        self.metrics: Any = None


class Snapshot:
    __slots__ = ("config", "router", "routes", "websocket_apis", "path_policy", "stages")

    def __init__(self, config: Config | None, router: Router, routes: list[CompiledRoute],
                 websocket_apis: dict[bytes, Any] | None = None):
        self.config = config
        # How request paths are normalised before routing (`http.path_normalization`).
        self.path_policy = config.path_policy if config is not None else STRICT
        self.router = router
        self.routes = routes
        # request path -> the WebSocket API handler (`ws_api`): checked before routing
        self.websocket_apis = websocket_apis or {}
        # With `stages`: which stage's snapshot a request goes to (`routing.stages`)
        self.stages: StageSelector | None = None


def compile_route(rc: RouteConfig, ctx: CompileContext, registry: Registry) -> CompiledRoute:
    """The route's chain (every registered policy asked in phase order) and its
    integration (the plugin of its `type`)."""
    chain = compile_chain(rc, ctx, registry)
    plugin = registry.integrations()[rc.integration.type]
    handler = plugin.compile(rc, ctx, chain.upstream_headers, chain.response_headers)
    return CompiledRoute(rc, rc.key, tuple(chain.stages), handler, tuple(chain.response_hooks),
                         tuple(chain.log_hooks))


def compile_context(config: Config, upstreams: dict[str, Upstream], runtime: dict[str, Any] | None = None,
                    resources: dict[str, Any] | None = None) -> CompileContext:
    """A snapshot's compile context, with every policy's `prepare` already run."""
    ctx = CompileContext(config, upstreams, resources or {}, runtime or {})
    for policy in config.registry.policies():
        state = policy.prepare(ctx)
        if state is not None:
            ctx.state[policy.name] = state
    return ctx


def build_snapshot(config: Config, upstreams: dict[str, Upstream], runtime: dict[str, Any] | None = None,
                   limits: Any = None, quota_counter: Any = None,
                   websocket_apis: dict[bytes, Any] | None = None, authorizer_outcomes: Any = None,
                   websockets_for: Callable[[Config], dict[bytes, Any]] | None = None) -> Snapshot:
    """`runtime`: each plugin's per-gateway state (JWKS sources, authorizer clients);
    `limits` (`throttle.stores.limits_for`) says where throttle buckets live, in process
    by default; `quota_counter` is the usage plans' counter; `authorizer_outcomes` the
    gateway's `observability.metrics.AuthorizerOutcomes`. `websockets_for(config)` builds
    a config's WebSocket APIs (path -> handler); with stages, each stage's own, reached
    under the stage like its routes (`/prod/chat`), and its canary side's."""
    limits = limits if limits is not None else LocalLimits(config)
    if config.stages is not None:  # one snapshot per stage (and canary side), chosen per request
        staged: dict[str, Snapshot] = {}
        sides: dict[str, Snapshot] = {}
        for name, canary, served in views(config):
            ws = websockets_for(served) if websockets_for is not None else None
            built = build_snapshot(served, upstreams, runtime, limits, quota_counter, ws, authorizer_outcomes)
            (sides if canary else staged)[name] = built
        canaries = {name: Canary(config.stages.stages[name].canary, snap) for name, snap in sides.items()}
        everything = [*staged.values(), *sides.values()]
        top = Snapshot(config, compile_routes([]), [r for s in everything for r in s.routes], None)
        top.stages = StageSelector(config.stages, staged, canaries)
        return top
    ctx = compile_context(config, upstreams, runtime,
                          {"limits": limits, "quota_counter": quota_counter,
                           "authorizer_outcomes": authorizer_outcomes})
    if websocket_apis is None and websockets_for is not None:
        websocket_apis = websockets_for(config)
    pairs = [(rc, compile_route(rc, ctx, config.registry)) for rc in config.routes]
    routes = [c for _, c in pairs]
    router = compile_routes(pairs)
    return Snapshot(config, router, routes, websocket_apis)
