"""Compile one route's chain from the plugin registry: stages, response and log hooks.

Owns the order of a route's chain: every registered policy's `compile` is asked, in
(phase, order, name) order; what it returns becomes the route's stages (decoders in
order), response hooks (encoders, in reverse) and log hooks. Built-in stages
(`FastStage`) run as they are; a user's functions are wrapped by `plugins.hooks`.
Nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgeplane.plugins.api import FastStage, PluginError, RouteStage
from edgeplane.plugins.hooks import PublicStage, check_hook

if TYPE_CHECKING:
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.plugins.base import CompileContext
    from edgeplane.plugins.registry import Registry


class Chain:
    """A route's compiled chain."""

    __slots__ = ("stages", "response_hooks", "log_hooks", "upstream_headers", "response_headers")

    def __init__(self) -> None:
        self.stages: list[Any] = []
        self.response_hooks: list[Any] = []
        self.log_hooks: list[Any] = []
        self.upstream_headers: frozenset[bytes] = frozenset()
        self.response_headers: frozenset[bytes] = frozenset()


def describer(config: Config) -> Callable[[RouteConfig], tuple[str, str]]:
    """For `edgeplane routes`: a route's integration summary and the policies that act on
    it, in chain order, as the registry's units describe them."""
    registry = config.registry

    def describe(route: RouteConfig) -> tuple[str, str]:
        plugin = registry.integrations().get(route.integration.type)
        summary = plugin.summary(route.integration) if plugin is not None else str(route.integration.type)
        policies = [p.name for p in registry.policies() if p.applies(route, config)]
        return summary, ", ".join(policies)

    return describe


def compile_chain(route: RouteConfig, ctx: CompileContext, registry: Registry) -> Chain:
    if route.auth is not None and route.auth not in ctx.config.authorizers:
        # Never serve a route without the authorizer it names: refuse the whole build.
        raise PluginError(f"route {route.key!r}: its authorizer {route.auth!r} is not in the config being "
                          "compiled; the route would be open (refusing to build it)")
    chain = Chain()
    upstream: set[bytes] = set()
    response: set[bytes] = set()
    for policy in registry.policies():
        upstream |= policy.upstream_headers(route, ctx.config)
        response |= policy.response_headers(route, ctx.config)
        compiled = policy.compile(route, ctx)
        if compiled is None:
            continue
        if isinstance(compiled, FastStage):
            chain.stages.append(compiled)
            continue
        if callable(compiled) and not isinstance(compiled, RouteStage):
            compiled = RouteStage(request=compiled)
        if not isinstance(compiled, RouteStage):
            raise PluginError(f"policy {policy.name!r}: compile() returned {type(compiled).__name__}; "
                              "expected None, a function or a RouteStage")
        if compiled.request is not None:
            chain.stages.append(PublicStage(policy.name, compiled.request, len(chain.stages)))
        if compiled.response is not None:
            check_hook(policy.name, "response", compiled.response)
            chain.response_hooks.append((policy.name, compiled.response))
        if compiled.log is not None:
            check_hook(policy.name, "log", compiled.log)
            chain.log_hooks.append((policy.name, compiled.log))
    chain.response_hooks.reverse()  # encoders run in reverse chain order
    chain.upstream_headers = frozenset(upstream)
    chain.response_headers = frozenset(response)
    return chain
