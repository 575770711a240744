"""What a plugin unit declares: `Policy` and `Integration`, and the contexts they get.

A policy unit is one object (usually a module-level `plugin = MyPolicy()`) that says:

- which config keys it owns: top-level `sections`, route-level `route_keys`, shared
  schema `defs`, and for an authorizer the `authorizers.NAME` shape of its `type`;
- how to turn each raw value into its model (`load_section`, `load_route`,
  `load_authorizer`), reporting problems with `ctx.fail(path, message)`;
- cross-section checks once the whole config is built (`check`);
- its compile step: per route, once per snapshot, the stage (or `RouteStage`) to run;
- its runtime: `start`/`stop` per gateway for what talks to the outside, and a `/stats`
  section.

An `Integration` is the same for `routes[].integration` of one `type`: its schema, its
loader, and `compile` returning the handler object (`handle(proto, req)`).

Invariants: a plugin object holds no per-gateway state (several gateways may share the
registry in one process); per-gateway state lives in `RuntimeContext.state[name]`, per
snapshot state in `CompileContext.state[name]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from edgeplane.plugins.api import Phase

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig

__all__ = ["Policy", "Integration", "CompileContext", "RuntimeContext"]

Schema = dict[str, Any]


class RuntimeContext:
    """One gateway's runtime, as plugins see it: the loop, the config, the upstream pools
    and one state slot per plugin (`state[plugin.name]`). During a reload's `start`,
    `previous` is the runtime being replaced: a plugin may move into its new state what
    serves an unchanged setting (a JWKS source, a decision cache), taking it out of
    `previous.state` so the old runtime's `stop` leaves it open."""

    __slots__ = ("loop", "config", "upstreams", "state", "previous", "_moved")

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, upstreams: Mapping[str, Any],
                 previous: RuntimeContext | None = None) -> None:
        self.loop = loop
        self.config = config
        self.upstreams = upstreams
        self.state: dict[str, Any] = {}
        self.previous = previous
        self._moved: list[tuple[str, dict[str, Any]]] = []  # what `carried` took, by state key

    def carried(self, key: str, kind: str) -> dict[str, Any]:
        """What `previous.state[key]` (a mapping by authorizer name) holds for the
        authorizers of type `kind` whose settings did not change, taken out of it."""
        previous = self.previous
        if previous is None:
            return {}
        old = previous.state.get(key) or {}
        before = previous.config.authorizers_of(kind)
        now = self.config.authorizers_of(kind)
        taken = {name: old.pop(name) for name in list(old)
                 if name in now and before.get(name) == now[name]}
        self._moved.append((key, taken))
        return taken

    def give_back(self) -> None:
        """A reload that failed: what `carried` took goes back to `previous`, which goes
        on serving with it, and out of this runtime's state, so stopping this runtime
        closes only what it made itself."""
        previous = self.previous
        if previous is None:
            return
        for key, taken in self._moved:
            previous.state.setdefault(key, {}).update(taken)
            mine = self.state.get(key)
            if isinstance(mine, dict):
                for name, value in taken.items():
                    if mine.get(name) is value:
                        del mine[name]
        self._moved.clear()


class CompileContext:
    """What a compile step may read: the config, the upstream pools, the gateway's shared
    stores (`resources`: "limits", "quota_counter", "authorizer_outcomes"), each plugin's runtime state and a
    per-snapshot state slot per plugin (filled by `Policy.prepare`)."""

    __slots__ = ("config", "upstreams", "resources", "runtime", "state")

    def __init__(self, config: Config, upstreams: Mapping[str, Any], resources: Mapping[str, Any],
                 runtime: Mapping[str, Any]) -> None:
        self.config = config
        self.upstreams = upstreams
        self.resources = resources
        self.runtime = runtime  # plugin name -> its RuntimeContext.state entry
        self.state: dict[str, Any] = {}

    def authorizer(self, route: RouteConfig, kind: str | None = None) -> Any:
        """The config of the route's authorizer (only if its type is `kind`, when given),
        or None."""
        cfg = self.config.authorizers.get(route.auth) if route.auth else None
        return cfg if cfg is not None and (kind is None or cfg.type == kind) else None

    def outcome_counts(self, authorizer: str) -> list[int]:
        """The list an authorizer's stages count their decisions in: [allowed, denied,
        error, cache hits] (`observability.metrics.AuthorizerOutcomes`), the gateway's
        when it keeps metrics, else a list of its own."""
        outcomes = self.resources.get("authorizer_outcomes")
        return outcomes.counts(authorizer) if outcomes is not None else [0, 0, 0, 0]


class Policy:
    """Base of a policy plugin. Subclass it, set the class attributes, override what the
    policy needs; every method has a do-nothing default."""

    name: ClassVar[str] = ""
    phase: ClassVar[Phase] = Phase.TRANSFORM
    order: ClassVar[int] = 0  # within the phase; lower runs first
    sections: ClassVar[Mapping[str, Schema]] = {}  # top-level key -> JSON schema
    route_keys: ClassVar[Mapping[str, Schema]] = {}  # key of a `routes[]` entry -> JSON schema
    # Keys this policy puts in `RequestView.context` -> what they hold: each becomes an
    # access-log variable `$context.<key>` (`access_log.format`).
    context_variables: ClassVar[Mapping[str, str]] = {}
    defs: ClassVar[Mapping[str, Schema]] = {}  # `$defs` entries the schemas refer to
    authorizer_type: ClassVar[str | None] = None  # `authorizers.NAME.type` it implements
    authorizer_schema: ClassVar[Schema | None] = None

    # -- config ----------------------------------------------------------------------
    def load_section(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        """The model of top-level section `key` (called only when the file sets it)."""
        return value

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        """The model of route-level key `key` (called only when the route sets it)."""
        return value

    def load_authorizer(self, name: str, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext) -> Any:
        """The model of `authorizers.NAME` whose type is `authorizer_type`."""
        return spec

    def check(self, config: Config, ctx: LoadContext) -> None:
        """Cross-section checks on the built config (routes, authorizers, plans...)."""

    # -- compile ---------------------------------------------------------------------
    def prepare(self, ctx: CompileContext) -> Any:
        """Once per snapshot, before any route compiles: shared objects (verifiers,
        plan levels). The result is `ctx.state[self.name]`."""
        return None

    def compile(self, route: RouteConfig, ctx: CompileContext) -> Any:
        """This policy's stage on `route` (a `FastStage`, a request function, or a
        `RouteStage`), or None when the route does not use the policy."""
        return None

    def applies(self, route: RouteConfig, config: Config) -> bool:
        """Whether this policy acts on `route` (for `edgeplane routes`): by default, when
        the route sets one of its `route_keys`, the file sets one of its `sections`, or
        the route's authorizer is of its `authorizer_type`."""
        if any(key in route.policies for key in self.route_keys):
            return True
        if any(key in config.policies for key in self.sections):
            return True
        auth = config.authorizers.get(route.auth) if route.auth else None
        return auth is not None and auth.type == self.authorizer_type

    def upstream_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        """Lower-case names of upstream headers this policy sets on `route`: copies the
        client sent are stripped by the integration."""
        return frozenset()

    def response_headers(self, route: RouteConfig, config: Config) -> frozenset[bytes]:
        """Lower-case names of response headers this policy owns on `route`: the
        upstream's copies are dropped (CORS, as AWS does)."""
        return frozenset()

    # -- runtime ---------------------------------------------------------------------
    async def start(self, runtime: RuntimeContext) -> None:
        """Per gateway, before the first snapshot: open what talks to the outside and
        keep it in `runtime.state[self.name]`."""

    async def stop(self, runtime: RuntimeContext) -> None:
        """Per gateway, at stop: close what `start` opened."""

    def stats(self, runtime: RuntimeContext) -> dict[str, Any] | None:
        """This policy's section of `/stats`, or None."""
        return None


class Integration:
    """Base of an integration plugin (`routes[].integration.type`)."""

    type: ClassVar[str] = ""
    schema: ClassVar[Schema] = {}  # the integration object's JSON schema (`type` is added)
    defs: ClassVar[Mapping[str, Schema]] = {}

    def load(self, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext, route_key: Any) -> Any:
        """The integration's model (an object with a `type` attribute). `route_key` is
        the parsed route key (`router.ParsedKey`) or None when it was invalid. The
        default: the mapping's keys as attributes (`spec["type"]` included)."""
        return SimpleNamespace(**spec)

    def compile(self, route: RouteConfig, ctx: CompileContext, upstream_headers: frozenset[bytes],
                response_headers: frozenset[bytes]) -> Any:
        """The handler object: `handler.handle(proto, req)` answers the request."""
        raise NotImplementedError

    def summary(self, model: Any) -> str:
        """One line about a route's integration, for `edgeplane routes`."""
        return self.type
