"""The `routes` and `authorizers` sections: core route keys, and dispatch to plugins.

Owns what every route has whatever the plugins (`route`, `host`, `integration`, `auth`,
`scopes`, `forward_claims`, `websocket`) and hands each other key to the policy that
registered it (`Policy.load_route`), each `integration` to the integration plugin of
its `type`, and each `authorizers.NAME` to the policy of its `type`. Plugin values land
in `RouteConfig.policies[key]`, keyed by the config key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeplane.config import model
from edgeplane.config.context import LoadContext, Path
from edgeplane.config.values import TOKEN_RE, normalize_route_host
from edgeplane.routing.router import ParsedKey, RouteKeyError, parse_route_key, route_problems


class RouteSections(LoadContext):
    if TYPE_CHECKING:  # provided by `WebSocketSections` beside this mixin on the loader's builder
        def websocket_limits(self, section: dict[str, Any], path: Path,
                             base: model.WebSocketLimits) -> model.WebSocketLimits: ...

    def authorizers(self, raw: dict[str, Any]) -> dict[str, Any]:
        section = raw.get("authorizers")
        out: dict[str, Any] = {}
        if not isinstance(section, dict):
            return out
        owners = self.registry.authorizer_types()
        for name, spec in section.items():
            if not isinstance(name, str) or not isinstance(spec, dict):
                continue
            owner = owners.get(spec.get("type"))
            if owner is None:
                continue  # an unknown type: reported by the schema pass
            cfg = self.call_plugin(owner, ("authorizers", name), owner.load_authorizer, name, spec,
                                   ("authorizers", name), self)
            if cfg is not None:
                out[name] = cfg
        return out

    def routes(self, raw: dict[str, Any]) -> tuple[model.RouteConfig, ...]:
        section = raw.get("routes")
        if not isinstance(section, list):
            return ()
        out: list[model.RouteConfig] = []
        for i, spec in enumerate(section):
            if isinstance(spec, dict):
                route = self.route(i, spec)
                if route is not None:
                    out.append(route)
        for index, msg in route_problems(out):
            self.fail(("routes", index), msg)
        return tuple(out)

    def route(self, i: int, spec: dict[str, Any]) -> model.RouteConfig | None:
        path: Path = ("routes", i)
        key = spec.get("route")
        parsed: ParsedKey | None = None
        if isinstance(key, str):
            try:
                parsed = parse_route_key(key)
            except RouteKeyError as exc:
                self.fail(path + ("route",), str(exc))
        host: str | None = None
        host_ok = True
        if isinstance(spec.get("host"), str):
            try:
                host = normalize_route_host(spec["host"])
            except ValueError as exc:
                self.fail(path + ("host",), str(exc))
                host_ok = False
        integration = self.integration(spec.get("integration"), path + ("integration",), parsed)
        auth: Any = spec.get("auth")  # any YAML value: checked below
        kinds = self.authorizer_types
        if isinstance(auth, str):
            self.known_authorizer(auth, path + ("auth",))
        scopes = tuple(x for x in spec.get("scopes") or () if isinstance(x, str))
        if (scopes or spec.get("forward_claims")) and kinds.get(auth, "jwt") != "jwt":
            self.fail(path + ("auth",), f"{auth!r} is not a JWT authorizer: scopes and "
                                        "forward_claims need a JWT authorizer")
        if scopes and not isinstance(auth, str):
            self.fail(path + ("scopes",), "scopes need a JWT authorizer ('auth')")
        claims = spec.get("forward_claims") or {}
        forward = tuple((k.lower(), v) for k, v in claims.items()
                        if isinstance(k, str) and isinstance(v, str))
        for name, _ in forward:
            if not TOKEN_RE.match(name):
                self.fail(path + ("forward_claims", name), "not a valid header name")
        if forward and not isinstance(auth, str):
            self.fail(path + ("forward_claims",), "forward_claims need a JWT authorizer ('auth')")
        policies: dict[str, Any] = {}
        for rkey, owner in self.registry.route_key_owners().items():
            if rkey in spec:
                value = self.call_plugin(owner, path + (rkey,), owner.load_route, rkey, spec[rkey],
                                         path + (rkey,), self)
                if value is not None:
                    policies[rkey] = value
        websocket = None
        if isinstance(spec.get("websocket"), dict):
            websocket = self.websocket_limits(spec["websocket"], path + ("websocket",),
                                              self.websocket_defaults)
            if integration is not None and integration.type != "http":
                self.fail(path + ("websocket",), "only used with an http integration "
                                                 "(WebSockets are proxied to an upstream)")
        if parsed is None or integration is None or not host_ok or not isinstance(key, str):
            return None
        return model.RouteConfig(key=key, method=parsed.method, path=parsed.path, host=host,
                                 integration=integration, index=i,
                                 auth=auth if isinstance(auth, str) else None, scopes=scopes,
                                 forward_claims=forward, websocket=websocket, policies=policies)

    def integration(self, spec: Any, path: Path, parsed: ParsedKey | None) -> Any:
        if not isinstance(spec, dict):
            return None
        plugin = self.registry.integrations().get(spec.get("type"))
        if plugin is None:
            return None  # an unknown type: reported by the schema pass
        return self.call_plugin(plugin, path, plugin.load, spec, path, self, parsed)
