"""An example edgeplane policy plugin: a tenant-header check and a response-header stamp.

Load it from a config file by module path (with this folder on PYTHONPATH, or the module
installed in your own package):

    plugins: ["tenant_header"]
    routes:
      - route: ANY /orders/{proxy+}
        integration: {type: http, upstream: orders}
        tenant:
          header: X-Tenant            # where the tenant comes from (default X-Tenant)
          allowed: [acme, globex]     # who may call this route
          status: 403                 # the refusal's status (default 403)
          message: unknown tenant     # the refusal's {"message": ...}

What it does, on each route that sets `tenant:`:
- request (phase AUTHORIZATION, after the authorizers): a missing or unlisted tenant is
  answered by the gateway with `status` and `{"message": message}`; an allowed one is put
  in the request's `context` (the access log records it under `context.tenant`, and a
  custom `access_log.format` can name it `$context.tenant`);
- response: every answer of the route carries `X-Tenant: <tenant>` (upstream answers and
  the gateway's own alike), so a caller can see whose data it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeplane.plugins import LocalReply, Phase, Policy, RequestView, ResponseView, RouteStage

_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["allowed"],
    "properties": {
        "header": {"type": "string", "default": "X-Tenant"},
        "allowed": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "status": {"type": "integer", "minimum": 400, "maximum": 499, "default": 403},
        "message": {"type": "string", "default": "unknown tenant"},
    },
}


@dataclass(frozen=True)
class TenantSettings:
    header: str
    allowed: frozenset[str]
    status: int
    message: str


class TenantHeader(Policy):
    name = "tenant"
    phase = Phase.AUTHORIZATION
    route_keys = {"tenant": _SCHEMA}
    # what `request.context` gets: `$context.tenant` in an `access_log.format`
    context_variables = {"tenant": "the caller's tenant, once the tenant check allowed it"}

    def load_route(self, key: str, value: Any, path: tuple[Any, ...], ctx: Any) -> TenantSettings | None:
        if not isinstance(value, dict) or not isinstance(value.get("allowed"), list):
            return None  # the schema pass reported the shape already
        allowed = [t for t in value["allowed"] if isinstance(t, str)]
        for i, tenant in enumerate(allowed):
            if not tenant.strip():
                ctx.fail(path + ("allowed", i), "a tenant name cannot be blank")
        return TenantSettings(header=value.get("header", "X-Tenant"), allowed=frozenset(allowed),
                              status=value.get("status", 403), message=value.get("message", "unknown tenant"))

    def compile(self, route: Any, ctx: Any) -> RouteStage | None:
        settings: TenantSettings | None = route.policies.get("tenant")
        if settings is None:
            return None

        def check(request: RequestView) -> LocalReply | None:
            tenant = request.header(settings.header)
            if tenant not in settings.allowed:
                return LocalReply(settings.status, {"message": settings.message})
            request.context["tenant"] = tenant
            return None

        def stamp(response: ResponseView) -> None:
            tenant = response.request.context.get("tenant")
            if tenant is not None:
                response.set_header("X-Tenant", tenant)

        return RouteStage(request=check, response=stamp)


plugin = TenantHeader()
