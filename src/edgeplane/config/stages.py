"""Stages, as Amazon API Gateway has them: `stages`, `stage_routing`, `domains`, and
stage variables (`${stageVariables.NAME}`).

Owns the model of these sections, their loading (names and values within AWS's
limits, every error located), the check that every reference resolves in every stage
(an undefined variable is an error naming the stage and the reference, as is a
resolved upstream that does not exist), and `for_stage(config, name)`: the config one
stage serves, its routes' references resolved and the stage's default route throttle
given to the routes without their own.

Where references may appear (this part of the stages work): a route's
`integration.upstream`, `integration.path` and `integration.split[].upstream`, a
mock integration's `body` and `headers` values, and a JWT authorizer's `issuer` and
`audience`.

Invariants: without `stages` nothing here runs and a config is served as before (one
`$default` stage at the root). A resolved value is an ordinary config value: the
upstream head choke point checks it like any other.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import TYPE_CHECKING, Any

from edgeplane.config.model import (
    CanaryConfig,
    DomainMapping,
    StageConfig,
    StagesConfig,
    UpstreamTls,
    WebSocketRouteConfig,
)
from edgeplane.config.values import check_host, parse_target

if TYPE_CHECKING:
    from edgeplane.config.context import LoadContext, Path
    from edgeplane.config.model import Config, RouteConfig

STAGE_VAR = re.compile(r"\$\{stageVariables\.([A-Za-z0-9_]+)\}")
# AWS's limits: stage names, variable names and values.
STAGE_NAME = re.compile(r"(\$default|[A-Za-z0-9_-]{1,128})")
VAR_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
VAR_VALUE = re.compile(r"[A-Za-z0-9\-._~:/?#&=,]{0,512}")
BASE_PATH = re.compile(r"[A-Za-z0-9\-._~]{1,128}(/[A-Za-z0-9\-._~]{1,128})*")

SCHEMA: dict[str, Any] = {
    "stages": {
        "type": "object", "minProperties": 1, "maxProperties": 10,
        "description": "The stages the API is served on: name -> variables and description.",
        "additionalProperties": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "variables": {"type": "object", "maxProperties": 100,
                              "additionalProperties": {"type": "string"}},
                "description": {"type": "string", "maxLength": 1024},
                "canary": {
                    "type": "object", "additionalProperties": False, "required": ["percent"],
                    "description": "A share of the stage's requests served with `variable_overrides`.",
                    "properties": {
                        "percent": {"type": "number", "minimum": 0, "maximum": 100},
                        "deployment": {"type": "string", "minLength": 1, "maxLength": 4096,
                                       "description": "The API the canary serves: a deployment id "
                                                      "(`edgeplane deployments`) or a config file; "
                                                      "default: the stage's own deployment."},
                        "variable_overrides": {"type": "object", "maxProperties": 100,
                                               "additionalProperties": {"type": "string"}},
                        "sticky": {"type": "object", "additionalProperties": False,
                                   "minProperties": 1, "maxProperties": 1,
                                   "properties": {"header": {"type": "string"}, "cookie": {"type": "string"}}},
                        "force_header": {"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
                    },
                },
                "access_log": {
                    "type": "object", "additionalProperties": False, "minProperties": 1,
                    "description": "The stage's own access-log format and/or destination (default: the "
                                   "gateway's).",
                    "properties": {"format": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 10000},
                                                        {"type": "object", "minProperties": 1}]},
                                   "destination": {"enum": ["stdout", "stderr", "file", "logging", "off", False]},
                                   "path": {"type": "string"}},
                },
                "throttle": {"$ref": "#/$defs/throttle",
                             "description": "The stage's default route throttle: each route of the stage "
                                            "without its own `throttle` gets this one (its own buckets)."},
            },
        },
    },
    "stage_routing": {"enum": ["base_path", "none"], "default": "base_path",
                      "description": "base_path: /{stage}/... reaches a stage; none: only `domains` "
                                     "and a `$default` stage at the root."},
    "domains": {
        "type": "object", "maxProperties": 120,
        "description": "Custom domain -> the stage it serves and an optional base path.",
        "additionalProperties": {
            "type": "object", "additionalProperties": False, "required": ["stage"],
            "properties": {"stage": {"type": "string"}, "base_path": {"type": "string"}},
        },
    },
}


def load(raw: dict[str, Any], ctx: LoadContext) -> StagesConfig | None:
    section = raw.get("stages")
    if not isinstance(section, dict):
        for key in ("stage_routing", "domains"):
            if key in raw:
                ctx.fail((key,), "only used with `stages`")
        return None
    stages: dict[str, StageConfig] = {}
    for name, spec in section.items():
        path: Path = ("stages", name)
        if not isinstance(name, str) or STAGE_NAME.fullmatch(name) is None:
            ctx.fail(path, "a stage name is 1 to 128 letters, digits, '-' or '_' (or $default)")
            continue
        spec = spec if isinstance(spec, dict) else {}
        found = spec.get("variables")
        variables: dict[Any, Any] = found if isinstance(found, dict) else {}
        for var, value in variables.items():
            if VAR_NAME.fullmatch(str(var)) is None:
                ctx.fail(path + ("variables", var), "a variable name is 1 to 64 letters, digits or '_'")
            elif not isinstance(value, str) or VAR_VALUE.fullmatch(value) is None:
                ctx.fail(path + ("variables", var), "a value is at most 512 of: letters, digits and - . _ ~ : / ? "
                                                    "# & = , (AWS's stage variable values)")
        throttle = None
        policy = ctx.registry.policy("throttle") if ctx.registry is not None else None
        if "throttle" in spec and policy is not None:
            throttle = policy.load_route("throttle", spec["throttle"], path + ("throttle",), ctx)
        stages[name] = StageConfig(name, tuple((str(k), str(v)) for k, v in variables.items()),
                                   str(spec.get("description", "")), throttle,
                                   _canary(spec.get("canary"), path + ("canary",), ctx))
    routing = raw.get("stage_routing", "base_path")
    domains: list[DomainMapping] = []
    found_domains = raw.get("domains")
    seen: dict[str, Any] = {}
    for host, spec in (found_domains if isinstance(found_domains, dict) else {}).items():
        path = ("domains", host)
        if not isinstance(spec, dict) or not isinstance(spec.get("stage"), str):
            continue
        name = str(host).lower().rstrip(".")
        why = _bad_host(name)
        if why:
            ctx.fail(path, why)
            continue
        if name in seen:
            ctx.fail(path, f"the same domain as {seen[name]!r} (host names ignore case and a final '.')")
            continue
        seen[name] = host
        if spec["stage"] not in stages:
            ctx.fail(path + ("stage",), f"unknown stage {spec['stage']!r} (stages: {', '.join(stages)})")
        base = spec.get("base_path", "")
        base = base.strip("/") if isinstance(base, str) else ""
        if base and (BASE_PATH.fullmatch(base) is None or any(s in (".", "..") for s in base.split("/"))):
            ctx.fail(path + ("base_path",), "a base path is segments of letters, digits, '-', '.', '_' or '~' "
                                            "('.' and '..' are not segments: request paths are normalised)")
        domains.append(DomainMapping(name, spec["stage"], base))
    if routing == "none" and "$default" not in stages and not domains:
        ctx.fail(("stage_routing",), "with 'none', requests reach a stage only through `domains` or a "
                                     "stage named $default")
    return StagesConfig(stages, routing if routing in ("base_path", "none") else "base_path", tuple(domains))


def _canary(spec: Any, path: Path, ctx: LoadContext) -> CanaryConfig | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("percent"), (int, float)):
        return None  # absent, or the schema pass reported it
    found = spec.get("variable_overrides")
    overrides: dict[Any, Any] = found if isinstance(found, dict) else {}
    for var, value in overrides.items():
        if VAR_NAME.fullmatch(str(var)) is None or not isinstance(value, str) or VAR_VALUE.fullmatch(value) is None:
            ctx.fail(path + ("variable_overrides", var), "as a stage variable: a name of 1 to 64 letters, digits "
                                                         "or '_', a value of at most 512 of letters, digits and "
                                                         "- . _ ~ : / ? # & = ,")
    found = spec.get("sticky")
    sticky: dict[str, Any] = found if isinstance(found, dict) else {}
    return CanaryConfig(float(spec["percent"]), tuple((str(k), str(v)) for k, v in overrides.items()),
                        sticky.get("header"), sticky.get("cookie"), spec.get("force_header"),
                        _canary_deployment(spec, path + ("deployment",), ctx))


DEPLOYMENT_ID = re.compile(r"d-[0-9a-f]{6,32}")


def _canary_deployment(spec: dict[str, Any], path: Path, ctx: LoadContext) -> str | None:
    """A deployment id as written, or a config file's absolute path (relative ones
    resolve against the config's folder, in the raw config too: a worker loads that);
    None when absent."""
    value = spec.get("deployment")
    if not isinstance(value, str) or not value:
        return None
    if DEPLOYMENT_ID.fullmatch(value):
        return value
    resolved = spec["deployment"] = ctx.path(value)
    if not os.path.isfile(resolved):
        ctx.fail(path, f"neither a deployment id (d-...) nor a config file: {resolved} does not exist")
    return resolved


def _bad_host(host: str) -> str | None:
    """Why `host` can never be a request's Host name (without the port), or None."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host!r} is not an IPv6 address"
        return None
    try:
        check_host(host, "a domain")
    except ValueError as exc:
        return f"{exc} (a domain is a host name or an address, without a port or a wildcard)"
    return None


def _references(rc: RouteConfig) -> list[tuple[tuple[Any, ...], str]]:
    """(path under the route, text) of every value of `rc` that may hold references."""
    integ = rc.integration
    out: list[tuple[tuple[Any, ...], str]] = []
    if integ.upstream:
        out.append((("integration", "upstream"), integ.upstream))
    if integ.path:
        out.append((("integration", "path"), integ.path))
    for i, (name, _) in enumerate(integ.split):
        out.append((("integration", "split", i, "upstream"), name))
    if integ.type == "mock":
        out.append((("integration", "body"), integ.body.decode("utf-8", "replace")))
        out += [(("integration", "headers", name), value) for name, value in integ.headers]
    return [(p, t) for p, t in out if STAGE_VAR.search(t)]


_AUTHORIZER_FIELDS = (("issuer", "issuer"), ("audiences", "audience"),  # (model field, config key)
                      ("jwks_url", "jwks.url"), ("url", "url"))
_URL_FIELDS = ("jwks_url", "url")  # a reference here: one resolved authorizer per stage (`expand`)


def _authorizer_references(config: Config) -> list[tuple[str, str, str]]:
    """(authorizer, config key, text) of every authorizer setting holding a reference."""
    out = []
    for name, a in config.authorizers.items():
        for attr, key in _AUTHORIZER_FIELDS:
            value = getattr(a, attr, None)
            for text in (value,) if isinstance(value, str) else value if isinstance(value, tuple) else ():
                if isinstance(text, str) and STAGE_VAR.search(text):
                    out.append((name, key, text))
    return out


def _variants(stages: StagesConfig) -> list[tuple[str, dict[str, str]]]:
    """Each stage (named for messages) with its variables, and its canary side with the
    overrides when it has one."""
    out = []
    for stage in stages.stages.values():
        out.append((f"stage {stage.name!r}", dict(stage.variables)))
        if stage.canary is not None:
            out.append((f"stage {stage.name!r} (its canary)",
                        {**dict(stage.variables), **dict(stage.canary.variable_overrides)}))
    return out


def _check_targets(config: Config, ctx: LoadContext) -> None:
    """An upstream's targets naming stage variables: each resolves, in every stage and
    canary side, to a target URL (located)."""
    for name, u in config.upstreams.items():
        for i, (url, _) in enumerate(u.templates):
            path: Path = ("upstreams", name, "targets", i)
            if config.stages is None:
                ctx.fail(path, f"{STAGE_VAR.search(url).group(0)} needs `stages`")  # type: ignore[union-attr]
                continue
            for label, variables in _variants(config.stages):
                missing = [n for n in STAGE_VAR.findall(url) if n not in variables]
                if missing:
                    ctx.fail(path, f"{label} has no variable {missing[0]!r} (${{stageVariables.{missing[0]}}})")
                    continue
                try:
                    target = parse_target(resolve(url, variables))
                except ValueError as exc:
                    ctx.fail(path, f"in {label} this is {resolve(url, variables)!r}: {exc}")
                    continue
                earlier = [parse_target(resolve(e, variables)) for e, _ in u.templates[:i]
                           if not _unresolved(e, variables)]
                if target in earlier:
                    ctx.fail(path, f"in {label} this is {str(target)!r}, a duplicate of an earlier target")
                elif u.tls != UpstreamTls() and i == len(u.templates) - 1 and target.scheme != "https" and not any(
                        t.scheme == "https" for t in earlier):
                    ctx.fail(("upstreams", name, "tls"), f"in {label} no target is https://: `tls` is only "
                                                          "used with https:// targets")


def _unresolved(url: str, variables: dict[str, str]) -> bool:
    """Whether `url` names a variable missing from `variables`, or resolves to no target."""
    if any(n not in variables for n in STAGE_VAR.findall(url)):
        return True
    try:
        parse_target(resolve(url, variables))
    except ValueError:
        return True
    return False


def check(config: Config, ctx: LoadContext) -> None:
    """Every reference resolves in every stage, to an upstream that exists (located)."""
    _check_targets(config, ctx)
    stages = config.stages
    for name, key, text in _authorizer_references(config):
        for where_, variables in _variants(stages) if stages is not None else ():
            missing = [n for n in STAGE_VAR.findall(text) if n not in variables]
            if missing:
                ctx.fail(("authorizers", name, key), f"{where_} has no variable {missing[0]!r} "
                                                     f"(${{stageVariables.{missing[0]}}})")
            elif key in ("jwks.url", "url"):
                from edgeplane.upstream.client import split_url  # (the URL rules of every outbound call)

                try:
                    split_url(resolve(text, variables))
                except ValueError as exc:
                    ctx.fail(("authorizers", name, key), f"in {where_} this is {resolve(text, variables)!r}: {exc}")
        if stages is None:
            ctx.fail(("authorizers", name, key), f"{STAGE_VAR.search(text).group(0)} needs `stages`")  # type: ignore[union-attr]
    for rc in config.routes:
        for where, text in _references(rc):
            path: Path = ("routes", rc.index, *where)
            if stages is None:
                ctx.fail(path, f"{STAGE_VAR.search(text).group(0)} needs `stages`")  # type: ignore[union-attr]
                continue
            for label, variables in _variants(stages):
                missing = [n for n in STAGE_VAR.findall(text) if n not in variables]
                if missing:
                    have = ", ".join(variables) or "none"
                    ctx.fail(path, f"{label} has no variable {missing[0]!r} "
                                   f"(${{stageVariables.{missing[0]}}}; its variables: {have})")
                elif where[-1] == "upstream" and resolve(text, variables) not in config.upstreams:
                    ctx.fail(path, f"in {label} this names upstream {resolve(text, variables)!r}, "
                                   f"which is not defined (upstreams: {', '.join(config.upstreams)})")
                elif where[-1] == "path" and (why := _bad_path(resolve(text, variables))):
                    ctx.fail(path, f"in {label} this path is {resolve(text, variables)!r}: {why}")


def _bad_path(path: str) -> str | None:
    """Why a resolved integration path cannot be sent upstream as it is, or None: the
    template rules, and nothing a variable could smuggle in (a query, a fragment, a dot
    or empty segment that would change which resource the upstream serves)."""
    if not path.startswith("/"):
        return "it must start with '/'"
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "an escape")):
        if ch in path:
            return f"{what} ({ch!r}) is not allowed in a path"
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        return "a '.' or '..' segment is not allowed"
    if any(s == "" for s in segments[:-1]):
        return "an empty segment ('//') is not allowed"
    return None


def resolve(text: str, variables: dict[str, str]) -> str:
    return STAGE_VAR.sub(lambda m: variables.get(m.group(1), ""), text)


def serves_websockets(config: Config) -> bool:
    """Whether any stage (or none: the config) serves a WebSocket API: the file's own,
    or a deployment's (`Config.apis`)."""
    return bool(config.websocket_apis) or any(
        side.websocket_apis for api in config.apis.values() for side in (api.config, api.canary) if side is not None)


def views(config: Config) -> list[tuple[str, bool, Config]]:
    """(stage, canary side?, the config it serves) of every stage and canary side of
    `config`, each with its references resolved (`for_stage`); `[("$default", False,
    config)]` without stages."""
    if config.stages is None:
        return [("$default", False, config)]
    out = []
    for name, stage in config.stages.stages.items():
        api = config.apis.get(name)
        if api is None:
            out.append((name, False, for_stage(config, name)))
            if stage.canary is not None:
                out.append((name, True, for_stage(config, name, canary=True)))
            continue
        out.append((name, False, api.config))  # resolved for its stage when composed
        if api.canary is not None:
            out.append((name, True, api.canary))
    return out


def variant_name(authorizer: str, stage: str, canary: bool = False) -> str:
    """The name of an authorizer's copy for one stage (its canary side), when a URL of
    it names a stage variable: `users@prod`, `users@prod:canary`."""
    return f"{authorizer}@{stage}{':canary' if canary else ''}"


def expand(config: Config) -> Config:
    """An authorizer whose JWKS URL or authorizer URL names a stage variable becomes one
    resolved copy per stage and canary side (`variant_name`), each with its own JWKS
    source or client (their runtime is per authorizer name); `for_stage` points each
    stage's routes at its copy. The template itself is never started."""
    config = _expand_upstreams(config)
    templates = {n: a for n, a in config.authorizers.items()
                 if any(isinstance(getattr(a, f, None), str) and STAGE_VAR.search(getattr(a, f)) for f in _URL_FIELDS)}
    if not templates or config.stages is None:
        return config
    authorizers = {n: a for n, a in config.authorizers.items() if n not in templates}
    for stage in config.stages.stages.values():
        for canary in (False, True) if stage.canary is not None else (False,):
            variables = {**dict(stage.variables), **(dict(stage.canary.variable_overrides)
                                                     if canary and stage.canary is not None else {})}
            for name, a in templates.items():
                copy = variant_name(name, stage.name, canary)
                authorizers[copy] = dataclasses.replace(a, name=copy, **_resolved(a, variables))
    return dataclasses.replace(config, authorizers=authorizers)


def _expand_upstreams(config: Config) -> Config:
    """An upstream whose targets name stage variables: one resolved copy per stage
    (`NAME@STAGE`), and one for a canary side whose overrides resolve it differently
    (`NAME@STAGE:canary`), each with its own pools; the template is never started."""
    templates = {n: u for n, u in config.upstreams.items() if u.templates}
    if not templates or config.stages is None:
        return config
    upstreams = {n: u for n, u in config.upstreams.items() if n not in templates}
    for stage in config.stages.stages.values():
        for canary in (False, True) if stage.canary is not None else (False,):
            variables = {**dict(stage.variables), **(dict(stage.canary.variable_overrides)
                                                     if canary and stage.canary is not None else {})}
            for name, u in templates.items():
                resolved = [(parse_target(resolve(url, variables)), weight) for url, weight in u.templates]
                targets = tuple(t for t, _ in resolved)
                weights = tuple(w for _, w in resolved) if any(w != 1 for _, w in resolved) else ()
                main = upstreams.get(variant_name(name, stage.name))
                if canary and main is not None and (main.targets, main.weights) == (targets, weights):
                    continue  # the canary side resolves it as the stage does: the stage's copy
                copy = variant_name(name, stage.name, canary)
                upstreams[copy] = dataclasses.replace(u, name=copy, targets=targets, weights=weights, templates=())
    return dataclasses.replace(config, upstreams=upstreams)


def _upstream_copy(name: str | None, config: Config, stage: str, canary: bool) -> str | None:
    """The upstream a stage side uses for `name`: its per-stage copy (`expand`), if any."""
    if name is None or name in config.upstreams:
        return name
    for copy in ((variant_name(name, stage, True),) if canary else ()) + (variant_name(name, stage),):
        if copy in config.upstreams:
            return copy
    return name


def _resolved(a: Any, variables: dict[str, str]) -> dict[str, Any]:
    """The fields of authorizer `a` that hold references, resolved."""
    changes: dict[str, Any] = {}
    for attr, _ in _AUTHORIZER_FIELDS:
        value = getattr(a, attr, None)
        if isinstance(value, str) and STAGE_VAR.search(value):
            changes[attr] = resolve(value, variables)
        elif isinstance(value, tuple) and any(isinstance(v, str) and STAGE_VAR.search(v) for v in value):
            changes[attr] = tuple(resolve(v, variables) for v in value)
    return changes


def for_stage(config: Config, name: str, canary: bool = False) -> Config:
    """The config stage `name` serves (its canary side with `canary`): its routes with
    every reference resolved."""
    stage = config.stages.stages[name] if config.stages is not None else None
    variables = dict(stage.variables) if stage is not None else {}
    if canary and stage is not None and stage.canary is not None:
        variables.update(stage.canary.variable_overrides)
    routes = []
    for rc in config.routes:
        rc = _with_copy(rc, config, name, canary, stage)  # a per-stage authorizer copy (`expand`)
        if stage is not None and stage.throttle is not None and "throttle" not in rc.policies:
            rc = dataclasses.replace(rc, policies={**rc.policies, "throttle": stage.throttle})
        if rc.integration.type == "http":
            side = canary and stage is not None and stage.canary is not None
            integ = rc.integration
            upstream = _upstream_copy(resolve(integ.upstream, variables) if integ.upstream else None, config,
                                      name, side)
            split = tuple((_upstream_copy(resolve(n, variables), config, name, side), w) for n, w in integ.split)
            if upstream != integ.upstream or split != integ.split:
                rc = dataclasses.replace(rc, integration=dataclasses.replace(integ, upstream=upstream, split=split))
        if not _references(rc):
            routes.append(dataclasses.replace(rc, stage=name))
            continue
        integ = rc.integration
        # (values are letters, digits and -._~:/?#&=, only: safe inside a JSON string)
        integ = dataclasses.replace(
            integ,
            upstream=resolve(integ.upstream, variables) if integ.upstream else integ.upstream,
            path=resolve(integ.path, variables) if integ.path else integ.path,
            split=tuple((resolve(n, variables), w) for n, w in integ.split),
            body=resolve(integ.body.decode("utf-8", "replace"), variables).encode() if integ.body else integ.body,
            headers=tuple((n, resolve(v, variables)) for n, v in integ.headers))
        routes.append(dataclasses.replace(rc, integration=integ, stage=name))
    websockets = config.websocket_apis
    if any((r.auth is not None and r.auth not in config.authorizers) or (
            r.integration is not None and r.integration.upstream is not None
            and r.integration.upstream not in config.upstreams)
           for a in websockets.values() for r in a.routes.values()):  # per-stage copies
        websockets = {n: dataclasses.replace(a, routes={k: _with_copy(r, config, name, canary, stage)
                                                         for k, r in a.routes.items()})
                      for n, a in websockets.items()}
    authorizers = dict(config.authorizers)
    for auth_name in {n for n, _, _ in _authorizer_references(config)}:
        authorizers[auth_name] = dataclasses.replace(authorizers[auth_name],
                                                     **_resolved(authorizers[auth_name], variables))
    return dataclasses.replace(config, routes=tuple(routes), authorizers=authorizers, stages=None,
                               websocket_apis=websockets, stage_variables=tuple(sorted(variables.items())))


def _with_copy(route: Any, config: Config, stage_name: str, canary: bool, stage: Any) -> Any:
    """`route` (HTTP or WebSocket) pointed at its authorizer's copy for this stage side,
    when its authorizer is a template (`expand`)."""
    side = canary and stage is not None and stage.canary is not None
    integ = getattr(route, "integration", None)
    if (isinstance(route, WebSocketRouteConfig) and integ is not None and integ.upstream is not None
            and integ.upstream not in config.upstreams):
        route = dataclasses.replace(route, integration=dataclasses.replace(
            integ, upstream=_upstream_copy(integ.upstream, config, stage_name, side)))
    if route.auth is None or route.auth in config.authorizers:
        return route
    copy = variant_name(route.auth, stage_name, side)
    return dataclasses.replace(route, auth=copy) if copy in config.authorizers else route
