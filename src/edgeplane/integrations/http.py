"""The `http` integration unit: proxy the request to an upstream (AWS HTTP_PROXY).

Owns `routes[].integration` of `type: http` (upstream, path template checked against
the route key's parameters, timeout 50ms..30s, preserve_host) and compiles the route's
`upstream.proxy.HttpIntegration`, with the WebSocket relay settings for handshakes on
that route and the header sets the route's policies own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from edgeplane.config import model
from edgeplane.config.resilience import RETRIES_SCHEMA, load_retries
from edgeplane.config.stages import STAGE_VAR
from edgeplane.config.values import (
    HTTP_INTEGRATION_TIMEOUT_MAX,
    INTEGRATION_TIMEOUT_MIN,
    TEMPLATE_PARAM_RE,
)
from edgeplane.plugins import Integration
from edgeplane.upstream.balance import Split
from edgeplane.upstream.proxy import HttpIntegration
from edgeplane.websocket.proxy import WsUpgradeExchange, relay_settings

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext
    from edgeplane.config.model import RouteConfig
    from edgeplane.plugins import CompileContext
    from edgeplane.routing.router import ParsedKey


_HTTP_INTEGRATION = {
    "additionalProperties": False,
    "properties": {
        "type": {"const": "http"},
        "upstream": {"type": "string", "description": "Name of an entry of `upstreams`."},
        "split": {
            "type": "array", "minItems": 1, "maxItems": 16,
            "description": "Instead of `upstream`: the requests spread over upstreams by weight "
                           "(blue/green), by smooth weighted round robin.",
            "items": {"type": "object", "additionalProperties": False, "required": ["upstream", "weight"],
                      "properties": {"upstream": {"type": "string"},
                                     "weight": {"type": "integer", "minimum": 0, "maximum": 1000}}},
        },
        "path": {
            "type": "string",
            "description": "Upstream path template, e.g. '/v2/{proxy}'; default: the request path.",
        },
        "timeout": {
            "$ref": "#/$defs/duration",
            "default": "29s",
            "description": "Time for the upstream's response head once the request is sent, 50ms..24h "
                           "(past 30 s, AWS's limit, `validate` warns); past it the client gets 504.",
        },
        "retries": RETRIES_SCHEMA,
        "idle_timeout": {
            "$ref": "#/$defs/duration",
            "description": "While a body moves (either way): no byte for this long ends the exchange "
                           "(504 before the response head). Default: `timeout`.",
        },
        "preserve_host": {
            "type": "boolean",
            "default": False,
            "description": "Forward the client's Host header instead of the target's.",
        },
    },
}


_KEYS = frozenset(cast(dict, _HTTP_INTEGRATION["properties"]))


def _load(spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext,
          parsed: ParsedKey | None) -> model.Integration:
    upstream = spec.get("upstream")
    split = _split(spec.get("split"), path + ("split",), ctx)
    if "upstream" in spec and "split" in spec:
        ctx.fail(path, "give one of 'upstream' and 'split', not both")
    elif "upstream" not in spec and "split" not in spec and set(spec) <= _KEYS:
        ctx.fail(path, "missing required key 'upstream' (or 'split')")  # (an unknown key was reported)
    if not (isinstance(upstream, str) and STAGE_VAR.search(upstream)):  # else checked per stage
        ctx.known_upstream(upstream, path + ("upstream",), ctx.upstream_names)
    template = spec.get("path")
    if isinstance(template, str):  # a stage variable stands for a segment's text here
        _check_template(STAGE_VAR.sub("stage-variable", template), path + ("path",), parsed, ctx)
    else:
        template = None
    timeout = ctx.integration_timeout(spec, path, advice=": fine for long polls and streams, but a client "
                                                         "waits that long for a stuck upstream")
    idle = (ctx.duration(spec, "idle_timeout", path, timeout, low=INTEGRATION_TIMEOUT_MIN,
                         high=HTTP_INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
            if "idle_timeout" in spec else None)
    preserve = spec.get("preserve_host", False)
    return model.Integration(
        type="http",
        upstream=upstream if isinstance(upstream, str) else None,
        split=split,
        path=template,
        timeout=timeout,
        idle_timeout=idle,
        retries=load_retries(spec.get("retries"), path + ("retries",), ctx),
        preserve_host=preserve if isinstance(preserve, bool) else False,
    )

def _split(value: Any, path: tuple[Any, ...], ctx: LoadContext) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        return ()
    out: list[tuple[str, int]] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            continue
        name, weight = item.get("upstream"), item.get("weight")
        if not isinstance(name, str) or not isinstance(weight, int) or isinstance(weight, bool):
            continue  # the schema pass reported it
        if not STAGE_VAR.search(name):
            ctx.known_upstream(name, path + (i, "upstream"), ctx.upstream_names)
        if any(name == seen for seen, _ in out):
            ctx.fail(path + (i, "upstream"), f"upstream {name!r} is already in the split")
        out.append((name, weight))
    if out and not any(w for _, w in out):
        ctx.fail(path, "every weight is 0: at least one upstream must take requests")
    return tuple(out)


def _check_template(template: str, path: tuple[Any, ...], parsed: ParsedKey | None, ctx: LoadContext) -> None:
    if not template.startswith("/"):
        ctx.fail(path, f"path template {template!r} must start with '/'")
        return
    bad = next((ch for ch in template if ch in "?# " or not ch.isprintable() or not ch.isascii()), None)
    if bad is not None:
        ctx.fail(path, f"path template {template!r} contains {bad!r}: only a path is "
                        "allowed (printable ASCII, no query, fragment or spaces)")
        return
    if TEMPLATE_PARAM_RE.sub("", template).count("{") or TEMPLATE_PARAM_RE.sub("", template).count("}"):
        ctx.fail(path, f"path template {template!r} has an unbalanced '{{' or '}}'")
        return
    defined = parsed.param_names if parsed is not None else ()
    for name in TEMPLATE_PARAM_RE.findall(template):
        if name.endswith("+"):
            ctx.fail(path, f"write {{{name[:-1]}}} in a path template, not {{{name}}}")
            continue
        if parsed is None:
            continue  # the route key is invalid: reported already
        if name not in defined:
            if defined:
                have = ", ".join("{" + n + "}" for n in defined)
                ctx.fail(path, f"unknown parameter {{{name}}}: route {parsed.key!r} "
                                f"defines {have}")
            else:
                ctx.fail(path, f"unknown parameter {{{name}}}: route {parsed.key!r} "
                                "defines no parameters")



class HttpIntegrationPlugin(Integration):
    type = "http"
    schema = _HTTP_INTEGRATION

    def load(self, spec: dict[str, Any], path: tuple[Any, ...], ctx: LoadContext, route_key: Any) -> Any:
        return _load(spec, path, ctx, route_key)

    def compile(self, route: RouteConfig, ctx: CompileContext, upstream_headers: frozenset[bytes],
                response_headers: frozenset[bytes]) -> HttpIntegration:
        integ, config = route.integration, ctx.config
        upstream: Any = (Split([ctx.upstreams[n] for n, _ in integ.split], [w for _, w in integ.split])
                         if integ.split else ctx.upstreams[cast(str, integ.upstream)])  # one is always set
        return HttpIntegration(
            upstream, integ.path,
            integ.timeout, integ.preserve_host,
            claim_headers=upstream_headers, gateway_response_headers=response_headers,
            websocket=relay_settings(route.websocket or config.websocket, config.limits.send_timeout),
            websocket_exchange=WsUpgradeExchange, idle_timeout=integ.idle_timeout, retries=integ.retries,
            # a response mapping that reads the body (`policies.mapping`): the response is held
            hold_response=bool(getattr(route.policies.get("response_parameters"), "reads_body", False)),
        )

    def summary(self, model: Any) -> str:
        target = model.upstream or " | ".join(f"{n} {w}" for n, w in model.split)
        parts = [f"http -> {target}"]
        if model.path:
            parts.append(f"path={model.path}")
        parts.append(f"timeout={model.timeout:g}s")
        if model.preserve_host:
            parts.append("preserve_host")
        return " ".join(parts)


plugin = HttpIntegrationPlugin()
