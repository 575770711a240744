"""Config loading: YAML (or a dict) in, a validated `model.Config` out, or `ConfigError`.

This module owns the translation from the file users write to the frozen model every
other module reads. It never half-applies anything: either every check passes and a
complete `Config` is returned, or `ConfigError` lists *every* problem found, each as
``location: message`` (``routes[2].integration.upstream: unknown upstream 'userz'
(known: static, users)``). It does no I/O besides reading the file: no DNS, no sockets.

Before validation, a file's (or YAML text's) string values have their `${VAR}` and
`${VAR:-default}` substituted from the environment (`envsubst`; an unset variable is a
located error), then `overrides` are applied (dotted keys: "admin.listen"). Relative
file paths resolve against the config file's folder (`LoadContext.resolve_paths`).
Validation then runs in two passes over the raw dict:

1. JSON Schema (`config.schema.build_schema(registry)`, draft 2020-12): keys, types,
   enums, numeric ranges; the policies and integrations of the registry contribute
   their keys. jsonschema's messages are rewritten for humans (``unknown key
   'upstreamz', did you mean 'upstream'?``).
2. Semantic checks a schema cannot express, section by section (core sections here and
   in `sections`, `routes`, `websockets`; every plugin's `load_*` and `check`): upstream
   references, route key syntax, duplicate/unreachable routes, path templates,
   target URLs, listen addresses and their collisions, duration/size parsing and ranges,
   mock bodies and headers. These skip values of the wrong type (pass 1 reported them).
   When both passes flag the same value's *format*, the more specific semantic message
   is kept; errors that an earlier error explains are dropped (`humanize.Errors`), so
   one mistake gives one error.

Every error is a `Problem`: its location, message, and the line and column of the file
where the value is spelled (None for a dict or an override); `display` also names a
route by its key (``routes[2] (GET /users/{id}).integration.timeout``). `Config.warnings`
holds the same as `LocatedStr`s.

Units: durations are float seconds (numbers, or strings "500ms", "30s", "5m", "2h");
sizes are int bytes (ints, or strings "10240", "10KiB", "10MiB", "1MB").

Invariants:
- `load_config` never mutates the caller's dict; `Config.raw` is a deep copy with the
  variables substituted, the overrides applied and every file path resolved, so loading
  `Config.raw` again as a dict, from any directory, gives the same config;
- every `RouteConfig.integration.upstream` names a key of `Config.upstreams`;
- every route in `Config.routes` compiles (`router.compile_routes` cannot fail on it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from edgeplane.config import model
from edgeplane.config import stages as stages_section
from edgeplane.config.envsubst import substitute
from edgeplane.config.errors import LocatedErrors, LocatedStr, Problem
from edgeplane.config.errors import describe as _describe
from edgeplane.config.humanize import CHECK, ENV, LOAD, Errors, Finding, Path, display, humanize, loc, path_sort_key
from edgeplane.config.routes import RouteSections
from edgeplane.config.schema import validator_for
from edgeplane.config.sections import CoreSections
from edgeplane.config.values import parse_duration, parse_listen, parse_size, parse_target
from edgeplane.config.websockets import WebSocketSections
from edgeplane.config.yamlstrict import DocIndex, YamlSyntaxError, load_indexed
from edgeplane.plugins.api import PluginError
from edgeplane.plugins.registry import Registry, registry_for

__all__ = [
    "ConfigError",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_size",
    "parse_listen",
    "parse_target",
]


class ConfigError(LocatedErrors):
    """The config was refused. `errors` lists every problem as "location: message";
    `entries` the same as `Problem`s (with line, column and display location)."""

    what = "config"

    def __init__(self, errors: Iterable[str], source: str = "<config>",
                 entries: Sequence[Problem] | None = None) -> None:
        super().__init__(errors, source, entries)


class _Builder(CoreSections, RouteSections, WebSocketSections):
    """Every core section's loader on one `LoadContext`."""


# ---------------------------------------------------------------------------
# public entry points


def load_config(
    source: str | os.PathLike[str] | dict[str, Any], *, overrides: dict[str, Any] | None = None,
    plugins: Sequence[Any] = (),
) -> model.Config:
    """Load a config from a YAML file path or from an already-parsed dict. `plugins`:
    policy or integration objects to register beside the installed ones. Relative file
    paths in a file resolve against the file's folder; a dict is taken as built (paths
    relative to the current directory, no `${VAR}` substitution)."""
    if isinstance(source, dict):
        return _load_raw(source, "<dict>", overrides, plugins)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"(file): config file not found: {path}"], path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"(file): cannot read config file {path}: {exc}"], path) from None
    return load_config_text(text, path, overrides=overrides, plugins=plugins,
                            base_dir=os.path.dirname(os.path.abspath(path)))


def load_config_text(
    text: str, source_name: str = "<string>", *, overrides: dict[str, Any] | None = None,
    plugins: Sequence[Any] = (), base_dir: str | None = None,
) -> model.Config:
    """Load a config from YAML text; `source_name` is used in messages and `Config.source`.
    `${VAR}` values are substituted from the environment (`config.envsubst`); relative
    file paths resolve against `base_dir`, or stay relative to the current directory
    when it is None (text from stdin)."""
    try:
        raw, index = load_indexed(text)
    except YamlSyntaxError as exc:
        message = str(exc).partition(": ")[2]  # the position goes to line and column
        raise ConfigError([str(exc)], source_name,
                          [Problem("(yaml)", message, exc.line, exc.column)]) from None
    return _load_raw(raw, source_name, overrides, plugins, index, base_dir)


# ---------------------------------------------------------------------------
# the two passes


def _load_raw(raw: Any, source: str, overrides: dict[str, Any] | None, plugins: Sequence[Any],
              index: DocIndex | None = None, base_dir: str | None = None) -> model.Config:
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else _describe(raw)
        raise ConfigError([f"(root): expected a mapping of config keys, got {got}"], source)
    errors = Errors()
    if index is not None:  # YAML text: fresh objects, substituted into a new structure
        errors.stage = ENV
        try:
            raw = substitute(raw, os.environ, index.plain, errors.add)
        except RecursionError:  # a YAML alias that contains itself (`a: &x [*x]`)
            raise ConfigError(["(root): a YAML alias refers to itself (a recursive structure)"],
                              source) from None
        errors.stage = LOAD
    else:
        raw = copy.deepcopy(raw)
    overridden = _apply_overrides(raw, overrides, errors) if overrides else set()

    def locate(path: Path, msg: str, at: Path | None = None) -> Problem:
        if any(path[: len(o)] == o for o in overridden):
            return Problem(loc(path), msg, path=path, display=f"{display(path, raw)} (set by an override)")
        line, column = _position(index, at or path)
        return Problem(loc(path), msg, line, column, path, display(path, raw))

    registry = _registry(raw, plugins, errors)
    if registry is not None:
        for err in sorted(validator_for(registry).iter_errors(raw),
                          key=lambda e: path_sort_key(tuple(e.absolute_path))):
            errors.extend(humanize(err))
    config = _build(raw, source, errors, registry, base_dir, locate) if registry is not None else None
    if errors or config is None:
        found = errors.located(_route_keys(raw)) or [Finding((), "invalid config")]
        entries = [locate(f.path, f.msg, f.at) for f in found]
        raise ConfigError([str(e) for e in entries], source, entries)
    return config


def _position(index: DocIndex | None, path: Path) -> tuple[int | None, int | None]:
    """Line and column of `path`, or of its nearest ancestor the file spells out."""
    positions = index.positions if index is not None else {}
    while path:
        if path in positions:
            return positions[path]
        path = path[:-1]
    return None, None


def _route_keys(raw: dict[str, Any]) -> dict[str, list[int]]:
    """Route key -> the indexes of the routes written with it."""
    out: dict[str, list[int]] = {}
    routes = raw.get("routes")
    for i, spec in enumerate(routes if isinstance(routes, list) else ()):
        if isinstance(spec, dict) and isinstance(spec.get("route"), str):
            out.setdefault(spec["route"], []).append(i)
    return out


def _registry(raw: dict[str, Any], extra: Sequence[Any], errors: Errors) -> Registry | None:
    """The installed plugins, the config's `plugins:` modules and the caller's objects."""
    names = raw.get("plugins")
    modules: list[str] = []
    if isinstance(names, list):
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name:
                errors.add(("plugins", i), "expected a module path such as 'my_pkg.my_policy'")
                continue
            try:
                registry_for([name])
            except ImportError as exc:
                errors.add(("plugins", i), f"cannot import plugin module {name!r}: {exc}")
                continue
            except PluginError as exc:
                errors.add(("plugins", i), str(exc))
                continue
            modules.append(name)
    elif names is not None:
        errors.add(("plugins",), "expected a list of module paths")
    try:
        return registry_for(modules, extra)
    except PluginError as exc:
        errors.add(("plugins",), str(exc))
        return None


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], errors: Errors) -> set[Path]:
    """Set each override (dotted keys reach into mappings: "admin.listen"); None = unset.
    Returns the paths set: their errors point at no line of the file."""
    done: set[Path] = set()
    for key, value in overrides.items():
        if value is None:
            continue
        parts = str(key).split(".")
        target: Any = raw
        for depth, part in enumerate(parts[:-1]):
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            if not isinstance(nxt, dict):
                errors.add(tuple(parts[: depth + 1]), f"cannot apply override {key!r}: not a mapping")
                break
            target = nxt
        else:
            target[parts[-1]] = value
            done.add(tuple(parts))
    return done



def _build(raw: dict[str, Any], source: str, errors: Errors, registry: Registry, base_dir: str | None,
           locate: Callable[[Path, str], Problem]) -> model.Config | None:
    b = _Builder(raw, errors, registry, base_dir)
    b.resolve_file_paths(raw)  # before any section reads a file; plugins resolve their own
    listen = b.listen(raw)
    admin = b.admin(raw, listen)
    taken: list[tuple[Path, model.ListenAddress]] = [
        ((("listen", i) if isinstance(raw.get("listen"), list) else ("listen",)), a)
        for i, a in enumerate(listen)]
    if admin.listen is not None:
        taken.append((("admin", "listen"), admin.listen))
    tls = b.tls(raw, taken)
    upstreams = b.upstreams(raw)
    policies: dict[str, Any] = {}
    for key, owner in registry.section_owners().items():
        if key in raw:
            value = b.call_plugin(owner, (key,), owner.load_section, key, raw[key], (key,), b)
            if value is not None:
                policies[key] = value
    authorizers = b.authorizers(raw)
    if isinstance(raw.get("websocket"), dict):
        b.websocket_defaults = b.websocket_limits(raw["websocket"], ("websocket",), model.WebSocketLimits())
    routes = b.routes(raw)
    ws_apis = b.websocket_apis(raw, b.upstream_names, routes)
    cluster = b.cluster(raw)
    limits = b.limits(raw)
    access_log = b.access_log(raw)
    stages = stages_section.load(raw, b)
    access_log = b.stage_access_logs(raw, access_log)
    drain = b.duration(raw, "drain_timeout", (), 30.0, low_inclusive=True)
    drain_delay = b.duration(raw, "drain_delay", (), 0.0, low_inclusive=True)
    http = raw["http"] if isinstance(raw.get("http"), dict) else {}
    config = model.Config(
        listen=listen,
        workers=raw.get("workers", 1),
        parser=http.get("parser", "native"),
        path_policy=b.path_policy(http),
        admin=admin,
        upstreams=upstreams,
        routes=routes,
        limits=limits,
        access_log=access_log,
        drain_timeout=drain,
        drain_delay=drain_delay,
        log_level=raw.get("log_level", "info"),
        log_format=(raw.get("log") or {}).get("format", "text") if isinstance(raw.get("log"), dict) else "text",
        authorizers=authorizers,
        tls=tls,
        data_dir=raw.get("data_dir", "data"),
        cluster=cluster,
        tracing=b.tracing(raw),
        stages=stages,
        websocket=b.websocket_defaults,
        websocket_apis=ws_apis,
        policies=policies,
        plugins=tuple(registry.modules),
        registry=registry,
        source=source,
        raw=raw,
    )
    stages_section.check(config, b)
    errors.stage = CHECK  # their findings on an item that already failed are follow-ons
    for policy in registry.policies():  # also on a config with errors: every problem is listed
        b.call_plugin(policy, (), policy.check, config, b)
    if config.authorizers and config.path_policy.relaxed:
        b.warn(("http", "path_normalization"),
               f"{', '.join(config.path_policy.relaxed)} switched off while authorizers are "
               "configured: a path spelled differently may reach the upstream without "
               "matching the route its authorizer protects")
    if errors:
        return None
    if b.warnings:
        ordered = sorted(b.warnings, key=lambda w: path_sort_key(w[0]))
        config = dataclasses.replace(config, warnings=tuple(LocatedStr(locate(p, m)) for p, m in ordered))
    return stages_section.expand(config)
