"""The admin listener's API, served by the same HTTP server as the data plane.

Owns the admin routes, compiled into an ordinary snapshot whose integrations are
`FunctionIntegration`s:
- `GET /healthz`: 200 `{"status": "ok"}`, or 503 `{"status": "draining"}` during shutdown;
- `GET /upstreams`: per-upstream, per-target pool and per-connection telemetry;
- `GET /stats`: connection, request and error counters of the data listeners;
- `GET /routes`: the compiled route table in match-priority order.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import orjson

from .model import Integration, RouteConfig
from .router import compile_routes
from .snapshot import CompiledRoute, FunctionIntegration, Snapshot

if TYPE_CHECKING:
    from .gateway import Gateway

_JSON = b"application/json"
_PLACEHOLDER = Integration(type="mock")


def _json(status: int, obj: object) -> tuple[int, bytes, bytes]:
    return status, orjson.dumps(obj, option=orjson.OPT_INDENT_2), _JSON


def build_admin_snapshot(gateway: Gateway) -> Snapshot:
    def healthz(req):
        if gateway.draining:
            return _json(503, {"status": "draining"})
        return _json(200, {"status": "ok", "pid": os.getpid()})

    def upstreams(req):
        now = gateway.loop.time()
        return _json(200, {"upstreams": [u.telemetry(now) for u in gateway.upstreams.values()]})

    def stats(req):
        return _json(200, gateway.stats())

    def routes(req):
        table = gateway.snapshot.router.table()
        return _json(200, {"routes": [
            {"priority": i + 1, "route": rc.key, "host": rc.host, "integration": rc.integration.type}
            for i, rc in enumerate(table)
        ]})

    handlers = {"/healthz": healthz, "/upstreams": upstreams, "/stats": stats, "/routes": routes}
    compiled = []
    for i, (path, fn) in enumerate(handlers.items()):
        rc = RouteConfig(key=f"GET {path}", method="GET", path=path, host=None,
                         integration=_PLACEHOLDER, index=i)
        compiled.append(CompiledRoute(rc, rc.key, (), FunctionIntegration(fn)))
    router = compile_routes([(c.config, c) for c in compiled])
    return Snapshot(None, router, compiled)
