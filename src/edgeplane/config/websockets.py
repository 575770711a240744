"""The WebSocket sections: `websocket` limits (top level and per route) and `websocket_apis`.

Owns the AWS-model WebSocket APIs' config: paths and hosts (which must not clash with
each other or with HTTP routes), route selection expressions, route keys, their
integrations, `$connect`-only authorizers, and per-API limits over the defaults.
"""

from __future__ import annotations

from edgeplane.config import model
from edgeplane.config.context import LoadContext, Path
from edgeplane.config.errors import short as _short
from edgeplane.config.values import (
    INTEGRATION_TIMEOUT_MAX,
    INTEGRATION_TIMEOUT_MIN,
    MAX_THROTTLE,
    WS_MAX_MESSAGE,
    hosts_overlap,
    normalize_route_host,
)
from edgeplane.routing.router import RouteKeyError, parse_route_key


class WebSocketSections(LoadContext):
    def websocket_limits(self, section: dict, path: Path,
                         base: model.WebSocketLimits) -> model.WebSocketLimits:
        """A `websocket:`-shaped mapping; keys it does not set keep `base`'s values."""
        size = self.size(section, "max_message_bytes", path, base.max_message_bytes, low=1)
        if size > WS_MAX_MESSAGE:
            self.fail(path + ("max_message_bytes",), f"must be at most 16MiB ({WS_MAX_MESSAGE} bytes), "
                                                     f"got {_short(section['max_message_bytes'])}")
        frame = self.size(section, "max_frame_bytes", path, base.max_frame_bytes, low=1)
        if frame > WS_MAX_MESSAGE:
            self.fail(path + ("max_frame_bytes",), f"must be at most 16MiB ({WS_MAX_MESSAGE} bytes), "
                                                   f"got {_short(section['max_frame_bytes'])}")
        rate = section.get("messages_per_second", base.messages_per_second)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            rate = base.messages_per_second if rate is not None else None
        elif rate > MAX_THROTTLE:
            self.fail(path + ("messages_per_second",), f"must be <= {MAX_THROTTLE:,} (got {_short(rate)})")
        conn_rate = section.get("connections_per_second", base.connections_per_second)
        if not isinstance(conn_rate, (int, float)) or isinstance(conn_rate, bool) or conn_rate <= 0:
            conn_rate = base.connections_per_second
        elif conn_rate > MAX_THROTTLE:
            self.fail(path + ("connections_per_second",), f"must be <= {MAX_THROTTLE:,} (got {_short(conn_rate)})")
        burst = self.integer(section, "message_burst", base.message_burst)
        if burst > MAX_THROTTLE:
            self.fail(path + ("message_burst",), f"must be <= {MAX_THROTTLE:,} (got {burst})")
        return model.WebSocketLimits(
            max_message_bytes=size,
            max_frame_bytes=frame,
            idle_timeout=self.duration(section, "idle_timeout", path, base.idle_timeout, high=86400.0),
            max_lifetime=self.duration(section, "max_lifetime", path, base.max_lifetime, high=7 * 86400.0),
            messages_per_second=None if rate is None else float(rate),
            message_burst=burst,
            ping_interval=self.duration(section, "ping_interval", path, base.ping_interval,
                                        high=3600.0, low_inclusive=True),
            pong_timeout=self.duration(section, "pong_timeout", path, base.pong_timeout, high=3600.0),
            connections_per_second=float(conn_rate),
        )

    def websocket_apis(self, raw: dict, upstream_names: list[str],
                       routes: tuple[model.RouteConfig, ...]) -> dict[str, model.WebSocketApiConfig]:
        section = raw.get("websocket_apis")
        out: dict[str, model.WebSocketApiConfig] = {}
        if not isinstance(section, dict):
            return out
        seen: list[tuple[str, str, str | None]] = []  # (api name, path, host)
        for name, spec in section.items():
            if not isinstance(name, str) or not isinstance(spec, dict):
                continue
            api = self.websocket_api(name, spec, ("websocket_apis", name), upstream_names)
            if api is None:
                continue
            where: Path = ("websocket_apis", name, "path")
            for other, other_path, other_host in seen:
                if other_path == api.path and other_host == api.host:
                    self.fail(where, f"{api.path!r} is also the path of websocket_apis.{other}"
                                     f"{' for the same host' if api.host else ''}")
                    break
            else:
                for r in routes:
                    if r.path == api.path and hosts_overlap(r.host, api.host):
                        self.fail(where, f"{api.path!r} clashes with routes[{r.index}] ({r.key!r}): the "
                                         "WebSocket API would take every request for that path")
                        break
            seen.append((name, api.path, api.host))
            out[name] = api
        return out

    def websocket_api(self, name: str, spec: dict, path: Path,
                      upstream_names: list[str]) -> model.WebSocketApiConfig | None:
        from edgeplane.websocket.selection import parse_selection

        raw_path = spec.get("path")
        api_path = raw_path if isinstance(raw_path, str) else ""  # read only while `ok`
        ok = isinstance(raw_path, str)
        if ok and (not api_path.startswith("/") or " " in api_path):
            self.fail(path + ("path",), f"invalid path {api_path!r}: it must start with '/' and "
                                        "have no spaces")
            ok = False
        elif ok:
            try:
                parsed = parse_route_key(f"GET {api_path}")
            except RouteKeyError as exc:
                self.fail(path + ("path",), f"invalid path {api_path!r}: "
                                            + str(exc).replace(f"route key 'GET {api_path}'", "it"))
                ok = False
            else:
                if parsed.param_names:
                    self.fail(path + ("path",), f"{api_path!r} must be a literal path "
                                                "(no {parameters}): one API answers one path")
                    ok = False
        host = None
        if isinstance(spec.get("host"), str):
            try:
                host = normalize_route_host(spec["host"])
            except ValueError as exc:
                self.fail(path + ("host",), str(exc))
                ok = False
        selection = spec.get("route_selection", "$request.body.action")
        if isinstance(selection, str):
            try:
                parse_selection(selection)
            except ValueError as exc:
                self.fail(path + ("route_selection",), str(exc))
        else:
            ok = False
        routes: dict[str, model.WebSocketRouteConfig] = {}
        section = spec.get("routes")
        for key, rspec in (section.items() if isinstance(section, dict) else ()):
            if not isinstance(key, str) or not isinstance(rspec, dict):
                continue
            route = self.websocket_route(key, rspec, path + ("routes", key), api_path if ok else "/",
                                         upstream_names)
            if route is not None:
                routes[key] = route
        limits = self.websocket_defaults
        if isinstance(spec.get("limits"), dict):
            limits = self.websocket_limits(spec["limits"], path + ("limits",), self.websocket_defaults)
        if not ok:
            return None
        return model.WebSocketApiConfig(name=name, path=api_path, host=host, route_selection=selection,
                                        routes=routes, limits=limits)

    def websocket_route(self, key: str, spec: dict, path: Path, api_path: str,
                        upstream_names: list[str]) -> model.WebSocketRouteConfig | None:
        from edgeplane.websocket.selection import check_route_key

        problem = check_route_key(key)
        if problem is not None:
            self.fail(path, problem)
        special = key in ("$connect", "$disconnect")
        integ_spec = spec.get("integration")
        integration = None
        if isinstance(integ_spec, dict) and integ_spec.get("type") == "function":
            ip = path + ("integration",)
            handler = integ_spec.get("handler")
            if not isinstance(handler, str):
                self.fail(ip, "missing required key 'handler' (a function integration)")
            else:
                from edgeplane.integrations.function.plugin import check_ref

                check_ref(handler, ip + ("handler",), self)
            if "upstream" in integ_spec:
                self.fail(ip + ("upstream",), "a function integration has no upstream")
            timeout = self.duration(integ_spec, "timeout", ip, 29.0, low=INTEGRATION_TIMEOUT_MIN,
                                    high=INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
            integration = model.WebSocketIntegration(upstream=None, path="/", timeout=timeout, type="function",
                                                     handler=handler if isinstance(handler, str) else None)
        elif isinstance(integ_spec, dict):
            ip = path + ("integration",)
            upstream = integ_spec.get("upstream")
            if upstream is None:
                self.fail(ip, "missing required key 'upstream' (an http integration)")
            self.known_upstream(upstream, ip + ("upstream",), upstream_names)
            target = integ_spec.get("path", api_path)
            if isinstance(target, str):
                bad = next((ch for ch in target if ch in "?#{} " or not ch.isprintable() or not ch.isascii()), None)
                if not target.startswith("/"):
                    self.fail(ip + ("path",), f"path {target!r} must start with '/'")
                elif bad is not None:
                    self.fail(ip + ("path",), f"path {target!r} contains {bad!r}: a literal path is "
                                              "expected (printable ASCII, no query, fragment, braces or spaces)")
            timeout = self.duration(integ_spec, "timeout", ip, 29.0, low=INTEGRATION_TIMEOUT_MIN,
                                    high=INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
            if isinstance(upstream, str) and isinstance(target, str):
                integration = model.WebSocketIntegration(upstream=upstream, path=target, timeout=timeout)
        elif not special:
            self.fail(path, "missing required key 'integration' (only $connect and $disconnect "
                            "may go without one)")
        auth = spec.get("auth")
        if isinstance(auth, str):
            if key != "$connect":
                self.fail(path + ("auth",), "authorizers run only on $connect (once, on the upgrade "
                                            "request); move 'auth' to the $connect route")
            else:
                self.known_authorizer(auth, path + ("auth",))
        else:
            auth = None
        scopes = tuple(x for x in spec.get("scopes") or () if isinstance(x, str))
        if scopes and key != "$connect":
            self.fail(path + ("scopes",), "scopes belong to the $connect route (with a JWT authorizer)")
        elif scopes and auth is None:
            self.fail(path + ("scopes",), "scopes need a JWT authorizer ('auth')")
        elif scopes and auth is not None and self.authorizer_types.get(auth, "jwt") != "jwt":
            self.fail(path + ("scopes",), f"{auth!r} is not a JWT authorizer: scopes need a JWT authorizer")
        ret = spec.get("return_response", False)
        if ret is True and special:
            self.fail(path + ("return_response",), f"{key} cannot answer the client with a message "
                                                   "(only message routes can)")
        return model.WebSocketRouteConfig(key=key, integration=integration, auth=auth, scopes=scopes,
                                          return_response=ret is True)

