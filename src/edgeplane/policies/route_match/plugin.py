"""The `match` unit: header and query-string conditions on a route, so one route key can
lead to several routes (`GET /users` for `x-api-version: 2` and for the others).

Owns the route-level `match: {headers: {NAME: VALUE | {regex: RE}}, query: {...}}`, loaded
into `routing.conditions.Conditions`, which the router compiles into its trie's leaves
(no stage runs per request). Precedence within one route key: a route with conditions
wins over the same key without them; among routes with conditions, the one with more
conditions, then more exact ones, then the one listed first. `validate` warns about two
routes of one key whose conditions a request could satisfy both, naming which wins.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from edgeplane.plugins import Phase, Policy
from edgeplane.routing.conditions import Condition, Conditions

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import Config, RouteConfig

_VALUE = {"anyOf": [{"type": "string"},
                    {"type": "object", "additionalProperties": False, "required": ["regex"],
                     "properties": {"regex": {"type": "string", "minLength": 1}}}]}
_SCHEMA = {"type": "object", "additionalProperties": False, "minProperties": 1,
           "description": "Conditions on the request's headers and query parameters: every one must hold.",
           "properties": {"headers": {"type": "object", "minProperties": 1, "additionalProperties": _VALUE},
                          "query": {"type": "object", "minProperties": 1, "additionalProperties": _VALUE}}}


class RouteMatchPolicy(Policy):
    name = "match"
    phase = Phase.EARLY
    order = -10
    route_keys = {"match": _SCHEMA}

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: LoadContext) -> Any:
        if not isinstance(value, dict):
            return None
        items: list[Condition] = []
        for kind, section in (("header", value.get("headers")), ("query", value.get("query"))):
            for name, spec in (section or {}).items() if isinstance(section, dict) else ():
                here = path + ("headers" if kind == "header" else "query", name)
                exact = spec if isinstance(spec, str) else None
                regex = spec.get("regex") if isinstance(spec, dict) else None
                if exact is None and not isinstance(regex, str):
                    continue  # the schema reported it
                try:
                    items.append(Condition(kind, name, exact, regex))
                except re.error as exc:
                    ctx.fail(here + ("regex",), f"not a regular expression: {exc}")
        return Conditions(items) if items else None

    def check(self, config: Config, ctx: LoadContext) -> None:
        by_key: dict[tuple[Any, ...], list[RouteConfig]] = {}
        for r in config.routes:
            conditions = r.policies.get("match")
            if conditions is None:
                continue
            if r.path is None:
                ctx.fail(("routes", r.index, "match"), "$default takes no conditions (it is the last resort)")
                continue
            by_key.setdefault(((r.host or "").lower(), r.key), []).append(r)
        for r in config.routes:  # a conditional route that skips the authorizer of its key's other routes
            conditions = r.policies.get("match")
            if conditions is None or r.path is None:
                continue
            guarded = [o for o in config.routes if o is not r and o.key == r.key
                       and (o.host or "").lower() == (r.host or "").lower() and o.auth != r.auth]
            if guarded:
                o = guarded[0]
                ctx.warn(("routes", r.index, "match"),
                         f"this route's authorizer ({r.auth or 'none'}) differs from routes[{o.index}]'s "
                         f"({o.auth or 'none'}) for the same key: a client that meets these conditions "
                         f"({conditions.ident}) gets this route's")
        for routes in by_key.values():
            ordered = sorted(routes, key=lambda r: (r.policies["match"].specificity, r.index))
            for i, first in enumerate(ordered):
                for later in ordered[i + 1:]:
                    a, b = first.policies["match"], later.policies["match"]
                    if not a.exclusive(b) and a.ident != b.ident:
                        ctx.warn(("routes", later.index, "match"),
                                 f"a request can satisfy both this route's conditions ({b.ident}) and those "
                                 f"of routes[{first.index}] ({a.ident}); routes[{first.index}] wins")

    def applies(self, route: RouteConfig, config: Config) -> bool:
        return "match" in route.policies


plugin = RouteMatchPolicy()
