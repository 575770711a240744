"""The `asgi` integration unit: `routes[].integration` of `type: asgi`, and the apps'
lifespans.

`app: "pkg.module:app"` names an ASGI 3 application, imported when the config loads (a
located error when it cannot be), run in process on the gateway's loop (`exchange`).
`root_path` is the route's literal prefix (`ANY /shop/{proxy+}` mounts the app at
`/shop`), with a stage's base path before it. The request's authorizer verdict is in
`scope["state"]` (Starlette: `request.state`): `authorizer` (JWT claims under `claims`
and `scopes`, a custom authorizer's `context`, or the API key's `apiKeyId`), with
`request_id` and `stage`.

`AsgiLifespans` (a policy that acts on no route) runs each app's lifespan: startup when
a gateway starts (or a reload first serves the app), shutdown when it stops (or a reload
stops serving it), as uvicorn's `lifespan: auto` does: an app that does not speak the
lifespan protocol (it raises on the lifespan scope, or returns) is served anyway; one that
reports `lifespan.startup.failed` stops the start (`LifespanFailed`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeplane.integrations.asgi.exchange import T_UPSTREAM, AsgiExchange, http_scope
from edgeplane.integrations.function.plugin import check_ref, resolve
from edgeplane.plugins import Integration, Phase, Policy

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request
    from edgeplane.plugins import CompileContext, RuntimeContext

log = logging.getLogger("edgeplane.asgi")

_ASGI_INTEGRATION = {
    "additionalProperties": False,
    "required": ["app"],
    "properties": {
        "type": {"const": "asgi"},
        "app": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                "description": "The ASGI 3 application, `package.module:name`."},
        "timeout": {"$ref": "#/$defs/duration", "default": "29s",
                    "description": "Time for the app to start its response (then 504); a response that "
                                   "has started may stream for as long as it likes."},
    },
}


@dataclass(frozen=True, slots=True)
class AsgiConfig:
    type: str
    app: str
    timeout: float = 29.0
    upstream: str | None = None  # (what the config core reads of every integration)
    split: tuple[tuple[str, int], ...] = ()
    path: str | None = None


def root_path(route: RouteConfig) -> str:
    """The route's literal prefix: `/shop` for `ANY /shop/{proxy+}`, "" for `$default`."""
    if route.path is None:
        return ""
    literal = re.split(r"/\{", route.path, maxsplit=1)[0]
    return "" if literal == "/" else literal.rstrip("/")


class AsgiIntegration:
    __slots__ = ("app", "name", "timeout", "root", "tasks", "lifespan_state", "ws_limits")

    def __init__(self, app: Any, name: str, timeout: float, root: str, lifespan_state: dict[str, Any],
                 ws_limits: Any = None) -> None:
        self.ws_limits = ws_limits  # the route's `websocket` limits (`config.model.WebSocketLimits`)
        self.app = app
        self.name = name
        self.timeout = timeout
        self.root = root
        self.tasks: set[asyncio.Task[None]] = set()
        self.lifespan_state = lifespan_state

    def handle(self, proto: HttpProtocol, req: Request) -> None:
        base = req.base_path[: len(req.base_path) - len(req.path)].decode("latin-1") if req.base_path else ""
        state = {**self.lifespan_state, "authorizer": _identity(req),
                 "request_id": req.request_id.decode("latin-1"), "stage": req.stage}
        scope = http_scope(proto, req, base + self.root, state)
        if req.websocket:
            from edgeplane.integrations.asgi.websocket import AsgiWebSocket

            AsgiWebSocket(self, proto, req, self.ws_limits).start(scope)
            return
        exchange = AsgiExchange(self, proto, req)
        req.exchange = exchange
        proto.set_deadline(T_UPSTREAM, self.timeout)
        exchange.start(scope)


def _identity(req: Request) -> dict[str, Any] | None:
    if req.claims is not None:
        return {"claims": dict(getattr(req.claims, "claims", req.claims)),
                "scopes": list(getattr(req.claims, "scopes", ()) or ())}
    if req.auth_context is not None:
        return {"context": dict(req.auth_context)}
    if req.api_key is not None:
        return {"apiKeyId": req.api_key.id}
    return None


class AsgiIntegrationPlugin(Integration):
    type = "asgi"
    schema = _ASGI_INTEGRATION

    def load(self, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext, route_key: Any) -> Any:
        app = spec.get("app")
        if isinstance(app, str):
            check_ref(app, path + ("app",), ctx)
        timeout = ctx.integration_timeout(spec, path)
        return AsgiConfig(type="asgi", app=app if isinstance(app, str) else "", timeout=timeout)

    def compile(self, route: RouteConfig, ctx: CompileContext, upstream_headers: frozenset[bytes],
                response_headers: frozenset[bytes]) -> AsgiIntegration:
        integ: Any = route.integration
        lifespans = ctx.runtime.get("asgi_lifespans")
        state = lifespans.state_of(integ.app) if isinstance(lifespans, AsgiLifespans.Runtime) else {}
        return AsgiIntegration(resolve(integ.app), integ.app, integ.timeout, root_path(route), state,
                               route.websocket or ctx.config.websocket)

    def summary(self, model: Any) -> str:
        return f"asgi {model.app}"


class LifespanFailed(OSError):
    """An app reported `lifespan.startup.failed`: the gateway cannot start. (An OSError, so
    `serve` reports it in one line, as it reports a listener it cannot bind.)"""


class _Lifespan:
    """One app's lifespan task and the queue its `receive` reads."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.name = app, name
        self.state: dict[str, Any] = {}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.supported = True

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self.inbox.get, self.answers.put)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an app without lifespan support raises on the scope type
            self.supported = False
            log.info("ASGI app %s: no lifespan (%s: %s); serving it without one", self.name, type(exc).__name__, exc)
        else:  # returned: it ignores lifespan scopes, or its lifespan is over (shutdown answered)
            self.supported = False
        await self.answers.put({"type": "lifespan.returned"})  # whoever waits for an answer stops waiting

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self.inbox.put({"type": "lifespan.startup"})
        answer = await self.answers.get()
        if answer["type"] == "lifespan.startup.failed":
            raise LifespanFailed(f"ASGI app {self.name}: lifespan startup failed: {answer.get('message', '')}")

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            answer = await asyncio.wait_for(self.answers.get(), 10.0)
            if answer["type"] == "lifespan.shutdown.failed":
                log.error("ASGI app %s: lifespan shutdown failed: %s", self.name, answer.get("message", ""))
        except TimeoutError:
            log.error("ASGI app %s: lifespan shutdown did not complete in 10 s", self.name)
            self.task.cancel()


class AsgiLifespans(Policy):
    """Owns the apps' lifespans per gateway; acts on no route."""

    name = "asgi_lifespans"
    phase = Phase.TRANSFORM

    class Runtime:
        def __init__(self) -> None:
            self.apps: dict[str, _Lifespan] = {}

        def state_of(self, ref: str) -> dict[str, Any]:
            found = self.apps.get(ref)
            return found.state if found is not None else {}

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return False

    async def start(self, runtime: RuntimeContext) -> None:
        from edgeplane.config.stages import views

        mine = self.Runtime()
        runtime.state[self.name] = mine
        routes = [r for _, _, served in views(runtime.config) for r in served.routes]
        refs = sorted({getattr(r.integration, "app", "") for r in routes if r.integration.type == "asgi"})
        previous = runtime.previous.state.get(self.name) if runtime.previous is not None else None
        taken: dict[str, Any] = {}
        for ref in refs:
            if isinstance(previous, self.Runtime) and ref in previous.apps:  # still served: keep it running
                mine.apps[ref] = taken[ref] = previous.apps.pop(ref)
                continue
            lifespan = _Lifespan(resolve(ref), ref)
            await lifespan.startup()
            mine.apps[ref] = lifespan
        if taken:
            runtime._moved.append((self.name, taken))  # a failed reload gives them back

    async def stop(self, runtime: RuntimeContext) -> None:
        mine = runtime.state.get(self.name)
        if isinstance(mine, self.Runtime):
            for lifespan in mine.apps.values():
                await lifespan.shutdown()
            mine.apps.clear()


plugin = AsgiIntegrationPlugin()
lifespans_plugin = AsgiLifespans()
