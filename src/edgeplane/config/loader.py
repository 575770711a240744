"""Config loading: YAML (or a dict) in, a validated `model.Config` out, or `ConfigError`.

This module owns the translation from the file users write to the frozen model every
other module reads. It never half-applies anything: either every check passes and a
complete `Config` is returned, or `ConfigError` lists *every* problem found, each as
``location: message`` (``routes[2].integration.upstream: unknown upstream 'userz'
(known: static, users)``). It does no I/O besides reading the file: no DNS, no sockets.

Validation runs in two passes over the raw dict (after `overrides` are applied):

1. JSON Schema (`edgeplane.schema.CONFIG_SCHEMA`, draft 2020-12): keys, types, enums,
   numeric ranges. jsonschema's messages are rewritten for humans (``unknown key
   'upstreamz', did you mean 'upstream'?``).
2. Semantic checks a schema cannot express: upstream references, route key syntax,
   duplicate/unreachable routes (`edgeplane.router.route_problems`), path templates,
   target URLs, listen addresses and their collisions, duration/size parsing and ranges,
   mock bodies and headers. These skip values of the wrong type (pass 1 reported them).
   When both passes flag the same value's *format*, the more specific semantic message
   is kept.

Units: durations are float seconds (numbers, or strings "500ms", "30s", "5m", "2h");
sizes are int bytes (ints, or strings "10240", "10KiB", "10MiB", "1MB").

Invariants:
- `load_config` never mutates the caller's dict; `Config.raw` is a deep copy with the
  overrides applied;
- every `RouteConfig.integration.upstream` names a key of `Config.upstreams`;
- every route in `Config.routes` compiles (`router.compile_routes` cannot fail on it).
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from edgeplane.config import model
from edgeplane.config.errors import LocatedErrors
from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short
from edgeplane.config.yamlstrict import YamlSyntaxError, load_strict
from edgeplane.routing.router import ParsedKey, RouteKeyError, parse_route_key, route_problems
from edgeplane.config.schema import CONFIG_SCHEMA, DURATION_RE, SIZE_RE

__all__ = [
    "ConfigError",
    "load_config",
    "load_config_text",
    "parse_duration",
    "parse_size",
    "parse_listen",
    "parse_target",
]

Path = tuple[Any, ...]

_VALIDATOR = Draft202012Validator(CONFIG_SCHEMA)

_INTEGRATION_TIMEOUT_MIN = 0.05
_INTEGRATION_TIMEOUT_MAX = 30.0
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_PATTERN = re.compile(DURATION_RE)
_SIZE_PATTERN = re.compile(SIZE_RE)
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TEMPLATE_PARAM_RE = re.compile(r"\{([^{}]*)\}")
# Headers the gateway writes itself; a mock may not set them.
_MANAGED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive",
                    "upgrade", "te", "trailer", "date"}
_BODYLESS_STATUSES = {204, 205, 304}

# Hand-written expectations for titled schema definitions (see schema.py).
_EXPECTED = {
    "duration": "a duration: seconds as a number, or a string like '500ms', '30s', '5m', '2h'",
    "size": "a size: bytes as an integer, or a string like '10240', '10KiB', '10MiB', '1MB'",
    "listen address": "a listen address 'host:port' (IPv6 as '[::1]:8080')",
    "listen": "a listen address 'host:port' or a non-empty list of them",
    "workers": "an integer >= 1 or 'auto'",
    "optional listen address": "a listen address 'host:port' or null",
}
_JSON_TYPE_NAMES = {"object": "mapping", "array": "list", "string": "string",
                    "integer": "integer", "number": "number", "boolean": "boolean",
                    "null": "null"}


class ConfigError(LocatedErrors):
    """The config was refused. `errors` lists every problem as "location: message"."""

    what = "config"

    def __init__(self, errors: Iterable[str], source: str = "<config>") -> None:
        super().__init__(errors, source)


# ---------------------------------------------------------------------------
# public entry points


def load_config(
    source: str | os.PathLike[str] | dict[str, Any], *, overrides: dict[str, Any] | None = None
) -> model.Config:
    """Load a config from a YAML file path or from an already-parsed dict."""
    if isinstance(source, dict):
        return _load_raw(source, "<dict>", overrides)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"(file): config file not found: {path}"], path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"(file): cannot read config file {path}: {exc}"], path) from None
    return load_config_text(text, path, overrides=overrides)


def load_config_text(
    text: str, source_name: str = "<string>", *, overrides: dict[str, Any] | None = None
) -> model.Config:
    """Load a config from YAML text; `source_name` is used in messages and `Config.source`."""
    return _load_raw(_parse_yaml(text, source_name), source_name, overrides)


# ---------------------------------------------------------------------------
# YAML


def _parse_yaml(text: str, source_name: str) -> Any:
    try:
        return load_strict(text)
    except YamlSyntaxError as exc:
        raise ConfigError([str(exc)], source_name) from None


# ---------------------------------------------------------------------------
# the two passes


@dataclass
class _Errors:
    schema: list[tuple[Path, str, bool]] = field(default_factory=list)  # (path, msg, replaceable)
    semantic: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, msg: str) -> None:
        self.semantic.append((path, msg))

    def __bool__(self) -> bool:
        return bool(self.schema or self.semantic)

    def formatted(self) -> list[str]:
        semantic_locs = {p for p, _ in self.semantic}
        items = [(p, m) for p, m, repl in self.schema if not (repl and p in semantic_locs)]
        items += self.semantic
        suggested = {(p, m.rsplit("did you mean ", 1)[1].rstrip("?"))
                     for p, m in items if m.startswith("unknown key") and "did you mean" in m}
        items = [(p, m) for p, m in items
                 if not (m.startswith("missing required key ") and (p, m[21:]) in suggested)]
        items.sort(key=lambda pm: _path_sort_key(pm[0]))  # stable: keeps pass order per path
        out: list[str] = []
        for p, m in items:
            line = f"{_loc(p)}: {m}"
            if line not in out:
                out.append(line)
        return out


def _load_raw(raw: Any, source: str, overrides: dict[str, Any] | None) -> model.Config:
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else _describe(raw)
        raise ConfigError([f"(root): expected a mapping of config keys, got {got}"], source)
    raw = copy.deepcopy(raw)
    errors = _Errors()
    if overrides:
        _apply_overrides(raw, overrides, errors)
    for err in sorted(_VALIDATOR.iter_errors(raw), key=lambda e: _path_sort_key(tuple(e.absolute_path))):
        errors.schema.extend(_humanize(err))
    config = _build(raw, source, errors)
    if errors or config is None:
        raise ConfigError(errors.formatted() or ["(root): invalid config"], source)
    return config


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], errors: _Errors) -> None:
    """Set each override (dotted keys reach into mappings: "admin.listen"); None = unset."""
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


# ---------------------------------------------------------------------------
# pass 1: schema errors for humans


def _humanize(err: ValidationError) -> list[tuple[Path, str, bool]]:
    path = tuple(err.absolute_path)
    v, value, inst = err.validator, err.validator_value, err.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties", {}))
        out = []
        for k in inst:
            if k in allowed:
                continue
            msg = f"unknown key {str(k)!r}"
            close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6)
            if close:
                msg += f", did you mean {close[0]!r}?"
            elif allowed:
                msg += f" (allowed: {', '.join(allowed)})"
            out.append((path, msg, False))
        return out
    if v == "required" and isinstance(inst, dict):
        return [(path, f"missing required key {k!r}", False) for k in value if k not in inst]
    if v == "type":
        return [(path, f"expected {_type_names(value)}, got {_describe(inst)}", False)]
    if v == "enum":
        shown = [x for x in value if not isinstance(x, bool)] or list(value)  # hide the `off` alias
        msg = f"{_short(inst)} is not one of {', '.join(repr(x) for x in shown)}"
        if isinstance(inst, str):
            close = difflib.get_close_matches(inst, [str(x) for x in value], n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        return [(path, msg, False)]
    if v == "const":
        return [(path, f"expected {value!r}, got {_describe(inst)}", False)]
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return [(path, f"must be {op} {value}, got {_short(inst)}", True)]
    if v == "minProperties":
        return [(path, "must not be empty" if value == 1 else f"needs at least {value} entries", False)]
    if v == "minItems":
        return [(path, "must not be empty" if value == 1 else f"needs at least {value} items", False)]
    if v == "pattern" and "propertyNames" in err.schema_path:
        return [(path, f"invalid name {_short(inst)}: use letters, digits, '_' and '-', "
                       "starting with a letter or '_'", False)]
    if v == "pattern":
        return [(path, f"{_short(inst)} is not in the expected format", True)]
    if v in ("anyOf", "oneOf"):
        deep = [e for e in err.context
                if len(e.absolute_path) > len(path) or e.validator not in ("type", "const", "enum", "pattern")]
        if deep:
            out: list[tuple[Path, str, bool]] = []
            for e in deep:
                out.extend(_humanize(e))
            return out
        expected = _EXPECTED.get(err.schema.get("title", ""))
        if expected:
            return [(path, f"expected {expected}, got {_describe(inst)}", True)]
    return [(path, err.message, False)]


def _type_names(types: str | list[str]) -> str:
    names = [_JSON_TYPE_NAMES.get(t, t) for t in ([types] if isinstance(types, str) else types)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _loc(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def _path_sort_key(path: Path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


# ---------------------------------------------------------------------------
# value parsers (public: the CLI and tests use them too)


def parse_duration(value: Any) -> float:
    """Seconds from a number or "500ms" / "30s" / "1.5m" / "2h" / "30"; ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected {_EXPECTED['duration']}, got {_describe(value)}")
    if isinstance(value, str):
        m = _DURATION_PATTERN.match(value)
        if m is None:
            raise ValueError(
                f"invalid duration {value!r}: use seconds as a number, or a string like "
                "'500ms', '30s', '5m', '2h'"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(3)]
    else:
        seconds = float(value)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number >= 0, got {_short(value)}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an int or "10240" / "10KiB" / "10MiB" / "1MB"; ValueError if bad."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected {_EXPECTED['size']}, got {_describe(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if not _SIZE_PATTERN.match(value):
        raise ValueError(
            f"invalid size {value!r}: use bytes as an integer, or a string like "
            "'10240', '10KiB', '10MiB', '1MB'"
        )
    m = re.match(r"\s*([0-9]+)\s*([A-Za-z]*)\s*$", value)
    assert m is not None
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_listen(text: Any) -> model.ListenAddress:
    """"host:port" or "[v6]:port" -> ListenAddress; ValueError with the reason if bad."""
    if not isinstance(text, str):
        raise ValueError(f"expected {_EXPECTED['listen address']}, got {_describe(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid listen address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError(f"invalid listen address {text!r}: expected '[host]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {text!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"invalid listen address {text!r}: write IPv6 addresses in brackets, e.g. '[::1]:8080'"
            )
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid listen address {text!r}: missing ':port' (e.g. '127.0.0.1:8080')")
        if not host:
            raise ValueError(
                f"invalid listen address {text!r}: missing host "
                "(use '0.0.0.0:PORT' for every IPv4 interface, '[::]:PORT' for every interface)"
            )
        _check_host(host, f"invalid listen address {text!r}")
    port = _parse_port(port_text, f"invalid listen address {text!r}", allow_zero=True)
    return model.ListenAddress(host, port)


def parse_target(text: Any) -> model.Target:
    """"http://host:port" or "https://host:port" -> Target; ValueError with the reason if bad."""
    if not isinstance(text, str):
        raise ValueError(f"expected a target URL 'http://host:port', got {_describe(text)}")
    what = f"invalid target {text!r}"
    if "://" not in text:
        raise ValueError(f"{what}: expected 'http://host:port'")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{what}: unsupported scheme {scheme!r} (expected 'http://host:port')")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what}: credentials in target URLs are not supported")
    if parts.path not in ("", "/"):
        raise ValueError(f"{what}: a target has no path (rewrite paths with integration.path)")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"{what}: a target has no query or fragment")
    netloc = parts.netloc
    host = parts.hostname
    if not host:
        raise ValueError(f"{what}: missing host")
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        _check_host(host, what)
    port_text = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    if ":" in port_text:
        port = _parse_port(port_text.rpartition(":")[2], what, allow_zero=False)
    else:
        port = 80 if scheme == "http" else 443
    return model.Target(scheme, host, port)


def _check_host(host: str, what: str) -> None:
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv4 address") from None
        return
    if not _HOSTNAME_RE.match(host.lower()):
        raise ValueError(f"{what}: {host!r} is not a valid host name")


def _parse_port(text: str, what: str, *, allow_zero: bool) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{what}: port must be a number, got {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what}: port must be {low}..65535, got {port}")
    return port


def _normalize_route_host(text: str) -> str:
    host = text.strip().lower().rstrip(".")
    what = f"invalid host {text!r}"
    if ":" in host:
        raise ValueError(f"{what}: route hosts have no port (the Host header's port is ignored)")
    bare = host[2:] if host.startswith("*.") else host
    if "*" in bare:
        raise ValueError(f"{what}: a wildcard is only allowed as a leading '*.' ('*.example.com')")
    if not bare or not _HOSTNAME_RE.match(bare):
        raise ValueError(f"{what}: expected a host name like 'api.example.com' or '*.example.com'")
    return host


# ---------------------------------------------------------------------------
# pass 2: semantic checks and model building


class _Builder:
    """Walks the raw dict, converting values and collecting semantic errors.

    Values of the wrong type are skipped silently (pass 1 reported them); the result is
    only used when no error at all was found.
    """

    def __init__(self, errors: _Errors) -> None:
        self.authorizer_names: set[str] = set()
        self.api_key_authorizers: set[str] = set()
        self.plan_names: set[str] = set()
        self.ws_defaults = model.WebSocketLimits()  # the top-level `websocket:` section
        self.errors = errors

    def fail(self, path: Path, msg: str) -> None:
        self.errors.add(path, msg)

    def duration(self, section: dict, key: str, path: Path, default: float, *,
                 low: float = 0.0, high: float | None = None, low_inclusive: bool = False) -> float:
        if key not in section:
            return default
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return default  # type error: reported by the schema
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(path + (key,), str(exc))
            return default
        too_low = seconds < low if low_inclusive else seconds <= low
        if too_low:
            bound = f">= {_fmt_seconds(low)}" if low_inclusive else f"> {_fmt_seconds(low)}"
            self.fail(path + (key,), f"must be {bound}, got {_short(value)}")
        elif high is not None and seconds > high:
            self.fail(path + (key,), f"must be <= {_fmt_seconds(high)}, got {_short(value)}")
        return seconds

    def size(self, section: dict, key: str, path: Path, default: int, *, low: int = 0) -> int:
        if key not in section:
            return default
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return default
        try:
            n = parse_size(value)
        except ValueError as exc:
            self.fail(path + (key,), str(exc))
            return default
        if n < low:
            self.fail(path + (key,), f"must be at least {low} bytes, got {_short(value)}")
        return n

    def integer(self, section: dict, key: str, default: int) -> int:
        value = section.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    # -- sections --------------------------------------------------------

    def listen(self, raw: dict) -> tuple[model.ListenAddress, ...]:
        return tuple(self.listen_list(raw.get("listen"), ("listen",), []))

    def listen_list(self, value: Any, path: Path,
                    seen: list[tuple[Path, model.ListenAddress]]) -> list[model.ListenAddress]:
        """One address or a list of them at `path`; each must not collide with an
        earlier one or with `seen` (extended with what is parsed here)."""
        if isinstance(value, str):
            items: list[tuple[Path, Any]] = [(path, value)]
        elif isinstance(value, list):
            items = [(path + (i,), v) for i, v in enumerate(value)]
        else:
            return []
        out: list[model.ListenAddress] = []
        for item_path, text in items:
            if not isinstance(text, str):
                continue
            try:
                addr = parse_listen(text)
            except ValueError as exc:
                self.fail(item_path, str(exc))
                continue
            for other_path, other in seen:
                if _collides(addr, other):
                    self.fail(item_path, f"{text!r} collides with {_loc(other_path)} "
                                         f"('{_fmt_addr(other)}')")
                    break
            seen.append((item_path, addr))
            out.append(addr)
        return out

    def admin(self, raw: dict, listen: Iterable[model.ListenAddress]) -> model.AdminConfig:
        section = raw.get("admin")
        if not isinstance(section, dict) or not isinstance(section.get("listen"), str):
            return model.AdminConfig()
        path = ("admin", "listen")
        try:
            addr = parse_listen(section["listen"])
        except ValueError as exc:
            self.fail(path, str(exc))
            return model.AdminConfig()
        for data in listen:
            if _collides(addr, data):
                self.fail(path, f"admin listener '{_fmt_addr(addr)}' collides with data "
                                f"listener '{_fmt_addr(data)}'")
                break
        return model.AdminConfig(addr)

    def upstreams(self, raw: dict) -> dict[str, model.UpstreamConfig]:
        section = raw.get("upstreams")
        if not isinstance(section, dict):
            return {}
        out: dict[str, model.UpstreamConfig] = {}
        for name, spec in section.items():
            path: Path = ("upstreams", name)
            if not isinstance(name, str):
                self.fail(path, f"upstream names must be strings, got {_describe(name)}")
                continue
            if not isinstance(spec, dict):
                continue
            targets = self.targets(spec.get("targets"), path + ("targets",))
            pool = self.pool(spec.get("pool"), path + ("pool",))
            tls = self.upstream_tls(spec.get("tls"), path + ("tls",), targets)
            out[name] = model.UpstreamConfig(name, targets, pool, tls)
        return out

    def targets(self, value: Any, path: Path) -> tuple[model.Target, ...]:
        if not isinstance(value, list):
            return ()
        out: list[model.Target] = []
        for i, text in enumerate(value):
            if not isinstance(text, str):
                continue
            try:
                target = parse_target(text)
            except ValueError as exc:
                self.fail(path + (i,), str(exc))
                continue
            if target in out:
                self.fail(path + (i,), f"duplicate target {str(target)!r}")
                continue
            out.append(target)
        return tuple(out)

    def ca_file(self, ca_file: str, path: Path) -> None:
        """A PEM CA bundle that OpenSSL can load."""
        import ssl

        try:
            ssl.create_default_context(cafile=ca_file)
        except FileNotFoundError:
            self.fail(path, f"file not found: {ca_file}")
        except (OSError, ssl.SSLError) as exc:
            self.fail(path, f"cannot load CA file {ca_file}: {getattr(exc, 'reason', None) or exc}")

    def upstream_tls(self, section: Any, path: Path,
                     targets: tuple[model.Target, ...]) -> model.UpstreamTls:
        if not isinstance(section, dict):
            return model.UpstreamTls()
        if targets and not any(t.scheme == "https" for t in targets):
            self.fail(path, "only used with https:// targets")
        ca_file = section.get("ca_file") if isinstance(section.get("ca_file"), str) else None
        if ca_file is not None:
            self.ca_file(ca_file, path + ("ca_file",))
        server_name = section.get("server_name")
        if isinstance(server_name, str):
            try:
                _check_host(server_name, f"invalid server name {server_name!r}")
            except ValueError as exc:
                self.fail(path + ("server_name",), str(exc))
        else:
            server_name = None
        verify = section.get("verify", True)
        return model.UpstreamTls(ca_file=ca_file, verify=verify if isinstance(verify, bool) else True,
                                 server_name=server_name)

    def tls(self, raw: dict, taken: list[tuple[Path, model.ListenAddress]]) -> model.TlsConfig | None:
        from edgeplane.http.tls import CertError, inspect_pair

        section = raw.get("tls")
        if not isinstance(section, dict):
            return None
        p: Path = ("tls",)
        listen = self.listen_list(section.get("listen"), p + ("listen",), list(taken))
        certs: list[model.TlsCertificate] = []
        entries = section.get("certificates")
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            cp: Path = p + ("certificates", i)
            if not isinstance(entry, dict):
                continue
            cert, key = entry.get("cert"), entry.get("key")
            if not isinstance(cert, str) or not isinstance(key, str):
                continue
            try:
                info = inspect_pair(cert, key)
            except CertError as exc:
                self.fail(cp, str(exc))
                continue
            hosts: list[str] = []
            given = entry.get("hosts")
            if isinstance(given, list):
                for j, h in enumerate(given):
                    if not isinstance(h, str):
                        continue
                    try:
                        hosts.append(_normalize_route_host(h))
                    except ValueError as exc:
                        self.fail(cp + ("hosts", j), str(exc))
            else:
                hosts = list(info.dns_names)
                if not hosts and i > 0:
                    self.fail(cp, f"{cert} has no DNS names in its subjectAltName: set 'hosts' "
                                  "(only the first, default certificate may go without)")
            certs.append(model.TlsCertificate(cert, key, tuple(hosts)))
        version = section.get("min_version", "1.2")
        if isinstance(version, float):
            version = f"{version:g}"
        if isinstance(version, (str, int)) and not isinstance(version, bool) and str(version) not in ("1.2", "1.3"):
            self.fail(p + ("min_version",), f"must be '1.2' or '1.3', got {_short(version)}")
            version = "1.2"
        client_ca = section.get("client_ca") if isinstance(section.get("client_ca"), str) else None
        client_cert = section.get("client_cert")
        if client_cert is not None and client_ca is None:
            self.fail(p + ("client_cert",), "needs 'client_ca' (the CA client certificates chain to)")
        if client_ca is not None:
            self.ca_file(client_ca, p + ("client_ca",))
        mode = "none" if client_ca is None else (client_cert if client_cert in ("optional", "required")
                                                 else "required")
        return model.TlsConfig(listen=tuple(listen), certificates=tuple(certs),
                               min_version=version if version in ("1.2", "1.3") else "1.2",
                               client_ca=client_ca, client_cert=mode)

    def pool(self, section: Any, path: Path) -> model.PoolConfig:
        if not isinstance(section, dict):
            return model.PoolConfig()
        d = model.PoolConfig()
        return model.PoolConfig(
            max_connections=self.integer(section, "max_connections", d.max_connections),
            max_idle=self.integer(section, "max_idle", d.max_idle),
            idle_timeout=self.duration(section, "idle_timeout", path, d.idle_timeout),
            connect_timeout=self.duration(section, "connect_timeout", path, d.connect_timeout),
            max_waiters=self.integer(section, "max_waiters", d.max_waiters),
            wait_timeout=self.duration(section, "wait_timeout", path, d.wait_timeout),
        )

    def routes(self, raw: dict, upstream_names: list[str]) -> tuple[model.RouteConfig, ...]:
        section = raw.get("routes")
        if not isinstance(section, list):
            return ()
        out: list[model.RouteConfig] = []
        for i, spec in enumerate(section):
            if isinstance(spec, dict):
                route = self.route(i, spec, upstream_names)
                if route is not None:
                    out.append(route)
        for index, msg in route_problems(out):
            self.fail(("routes", index), msg)
        return tuple(out)

    def route(self, i: int, spec: dict, upstream_names: list[str]) -> model.RouteConfig | None:
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
                host = _normalize_route_host(spec["host"])
            except ValueError as exc:
                self.fail(path + ("host",), str(exc))
                host_ok = False
        integration = self.integration(spec.get("integration"), path + ("integration",),
                                       parsed, upstream_names)
        auth = spec.get("auth")
        if isinstance(auth, str) and auth not in self.authorizer_names:
            known = ", ".join(sorted(self.authorizer_names)) or "none defined"
            self.fail(path + ("auth",), f"unknown authorizer {auth!r} (known: {known})")
        scopes = tuple(x for x in spec.get("scopes") or () if isinstance(x, str))
        if (scopes or spec.get("forward_claims")) and auth in self.api_key_authorizers:
            self.fail(path + ("auth",), f"{auth!r} is not a JWT authorizer: scopes and "
                                        "forward_claims need a JWT authorizer")
        if scopes and not isinstance(auth, str):
            self.fail(path + ("scopes",), "scopes need a JWT authorizer ('auth')")
        claims = spec.get("forward_claims") or {}
        forward = tuple((k.lower(), v) for k, v in claims.items()
                        if isinstance(k, str) and isinstance(v, str))
        for name, _ in forward:
            if not _TOKEN_RE.match(name):
                self.fail(path + ("forward_claims", name), "not a valid header name")
        if forward and not isinstance(auth, str):
            self.fail(path + ("forward_claims",), "forward_claims need a JWT authorizer ('auth')")
        cors_spec = spec.get("cors")
        cors = self.cors(cors_spec, path + ("cors",)) if isinstance(cors_spec, dict) else None
        ip_rules = self.ip_rules(spec.get("ip_rules"), path + ("ip_rules",))
        throttle = self.throttle(spec.get("throttle"), path + ("throttle",), route_level=True)
        websocket = None
        if isinstance(spec.get("websocket"), dict):
            websocket = self.websocket_limits(spec["websocket"], path + ("websocket",), self.ws_defaults)
            if integration is not None and integration.type != "http":
                self.fail(path + ("websocket",), "only used with an http integration "
                                                 "(WebSockets are proxied to an upstream)")
        if parsed is None or integration is None or not host_ok or not isinstance(key, str):
            return None
        return model.RouteConfig(key=key, method=parsed.method, path=parsed.path, host=host,
                                 integration=integration, index=i,
                                 auth=auth if isinstance(auth, str) else None, scopes=scopes,
                                 forward_claims=forward, cors=cors, cors_off=cors_spec is False,
                                 ip_rules=ip_rules, throttle=throttle, websocket=websocket)

    # -- edge policy ---------------------------------------------------------------
    def ip_rules(self, section: Any, path: Path) -> model.IpRulesConfig | None:
        if not isinstance(section, dict):
            return None
        allow = tuple(x for x in section.get("allow") or () if isinstance(x, str))
        deny = tuple(x for x in section.get("deny") or () if isinstance(x, str))
        self.cidrs(allow, path + ("allow",))
        self.cidrs(deny, path + ("deny",))
        return model.IpRulesConfig(allow=allow, deny=deny)

    def throttle(self, section: Any, path: Path, route_level: bool) -> model.ThrottleConfig | None:
        if not isinstance(section, dict):
            return None
        from edgeplane.policies.throttle.buckets import TokenBucket

        d = model.ThrottleConfig()
        rate = section.get("rate", d.rate)
        burst = section.get("burst", d.burst)
        try:
            TokenBucket(rate, burst)
        except (ValueError, TypeError) as exc:
            self.fail(path, str(exc))
            return None
        for name, value in (("rate", rate), ("burst", burst)):
            if value > _MAX_THROTTLE:  # a typo, not a limit: floats lose whole tokens up there
                self.fail(path + (name,), f"must be <= {_MAX_THROTTLE:,} (got {_short(value)})")
        if route_level and "headers" in section:
            self.fail(path + ("headers",), "set RateLimit headers with the top-level 'throttle.headers'")
        if not route_level and ("key" in section or "unresolved" in section):
            self.fail(path, "'key' and 'unresolved' belong to a route's throttle")
        key = section.get("key")
        return model.ThrottleConfig(rate=float(rate), burst=burst, headers=section.get("headers", True) is True,
                                    key=key if isinstance(key, str) else None,
                                    unresolved=section.get("unresolved", "shared"))

    def usage_plans(self, raw: dict) -> dict[str, model.UsagePlanConfig]:
        section = raw.get("usage_plans")
        out: dict[str, model.UsagePlanConfig] = {}
        if not isinstance(section, dict):
            return out
        from edgeplane.policies.quota.store import QuotaPeriod

        for name, spec in section.items():
            if not isinstance(spec, dict):
                continue
            path: Path = ("usage_plans", name)
            throttle = self.throttle(spec.get("throttle"), path + ("throttle",), route_level=True)
            per_route = spec.get("routes") if isinstance(spec.get("routes"), dict) else {}
            route_throttles = {}
            for key, t_spec in per_route.items():
                t = self.throttle(t_spec, path + ("routes", key), route_level=True)
                if t is not None and t.key is not None:
                    self.fail(path + ("routes", key, "key"), "a usage plan's throttle is per API key already")
                if t is not None:
                    route_throttles[key] = t
            quota = spec.get("quota") if isinstance(spec.get("quota"), dict) else {}
            period, offset = quota.get("period", "DAY"), quota.get("offset", 0)
            try:
                QuotaPeriod(period, offset)
            except (ValueError, TypeError) as exc:
                self.fail(path + ("quota",), str(exc))
            limit = quota.get("limit")
            out[name] = model.UsagePlanConfig(
                name=name, throttle=throttle, route_throttles=route_throttles,
                quota_limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
                quota_period=period if isinstance(period, str) else "DAY",
                quota_offset=offset if isinstance(offset, int) else 0)
        return out

    def cluster(self, raw: dict) -> model.ClusterConfig | None:
        section = raw.get("cluster")
        if not isinstance(section, dict) or not isinstance(section.get("redis"), str):
            return None
        path: Path = ("cluster",)
        url = section["redis"]
        try:
            from redis.asyncio.connection import parse_url

            parse_url(url)
        except (ValueError, TypeError) as exc:
            self.fail(path + ("redis",), f"not a Redis URL: {exc}")
        lease = section.get("lease", 0.1)
        return model.ClusterConfig(
            redis=url,
            key_prefix=section.get("key_prefix", "edgeplane:"),
            failure_mode=section.get("failure_mode", "open"),
            timeout=self.duration(section, "timeout", path, 0.1, high=60.0),
            lease=float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else 0.1,
            retry_interval=self.duration(section, "retry_interval", path, 1.0, high=3600.0))

    def trusted_proxies(self, raw: dict) -> tuple[str, ...]:
        entries = tuple(x for x in raw.get("trusted_proxies") or () if isinstance(x, str))
        self.cidrs(entries, ("trusted_proxies",))
        return entries

    def cidrs(self, entries: tuple[str, ...], path: Path) -> None:
        if not entries:
            return
        from edgeplane.policies.ip_rules.rules import parse_entry

        for j, entry in enumerate(entries):
            try:
                parse_entry(entry)
            except ValueError as exc:
                self.fail(path + (j,), str(exc))

    def cors(self, section: Any, path: Path) -> model.CorsConfig | None:
        if not isinstance(section, dict):
            return None
        from edgeplane.policies.cors.policy import CorsPolicy

        def strings(key: str) -> tuple[str, ...]:
            return tuple(x for x in section.get(key) or () if isinstance(x, str))

        max_age = section.get("max_age")
        cfg = model.CorsConfig(
            allow_origins=strings("allow_origins"), allow_methods=strings("allow_methods"),
            allow_headers=strings("allow_headers"), expose_headers=strings("expose_headers"),
            allow_credentials=section.get("allow_credentials") is True,
            max_age=max_age if isinstance(max_age, int) and not isinstance(max_age, bool) else None,
        )
        try:
            CorsPolicy.from_config(cfg)
        except ValueError as exc:
            self.fail(path, str(exc))
        return cfg

    def authorizers(self, raw: dict) -> dict[str, model.JwtAuthorizerConfig]:
        section = raw.get("authorizers")
        out: dict[str, model.JwtAuthorizerConfig] = {}
        if not isinstance(section, dict):
            return out
        for name, spec in section.items():
            if isinstance(name, str) and isinstance(spec, dict):
                self.authorizer_names.add(name)
                if spec.get("type") == "api_key":
                    self.api_key_authorizers.add(name)
                    cfg = self.api_key_authorizer(name, spec, ("authorizers", name))
                elif spec.get("type") == "http":
                    self.api_key_authorizers.add(name)  # no scopes/claims either
                    cfg = self.http_authorizer(name, spec, ("authorizers", name))
                else:
                    cfg = self.jwt_authorizer(name, spec, ("authorizers", name))
                if cfg is not None:
                    out[name] = cfg
        return out

    def http_authorizer(self, name: str, spec: dict, path: Path) -> model.HttpAuthorizerConfig | None:
        url = spec.get("url")
        if not isinstance(url, str):
            return None
        from edgeplane.policies.jwt.jwks_source import split_url

        try:
            split_url(url)
        except ValueError as exc:
            self.fail(path + ("url",), str(exc))
        sources = spec.get("identity_source", ["$request.header.Authorization"])
        sources = (sources,) if isinstance(sources, str) else tuple(s for s in sources if isinstance(s, str))
        ttl = self.duration(spec, "result_ttl", path, 300.0, low_inclusive=True)
        if ttl > 3600:
            self.fail(path + ("result_ttl",), "at most 3600s (AWS's maximum)")
        forward = spec.get("forward_context") or {}
        return model.HttpAuthorizerConfig(
            name=name, url=url, identity_source=sources, result_ttl=ttl,
            timeout=self.duration(spec, "timeout", path, 10.0),
            forward_context=tuple((k.lower(), v) for k, v in forward.items()
                                  if isinstance(k, str) and isinstance(v, str)),
            cache_max_entries=self.integer(spec, "cache_max_entries", 10_000))

    def api_key_authorizer(self, name: str, spec: dict, path: Path) -> model.ApiKeyAuthorizerConfig | None:
        keys_file = spec.get("keys_file")
        if not isinstance(keys_file, str):
            return None
        from edgeplane.policies.api_keys.store import ApiKeyFileError, load_key_file

        try:
            store = load_key_file(keys_file)
        except ApiKeyFileError as exc:
            for err in exc.errors:
                self.fail(path + ("keys_file",), err)
        else:
            for plan in sorted(store.plans() - self.plan_names):
                known = ", ".join(sorted(self.plan_names)) or "none defined"
                self.fail(path + ("keys_file",), f"keys refer to usage plan {plan!r}, which "
                                                 f"'usage_plans' does not define (known: {known})")
        return model.ApiKeyAuthorizerConfig(
            name=name, keys_file=keys_file,
            identity_source=spec.get("identity_source", "$request.header.X-API-Key"))

    def jwt_authorizer(self, name: str, spec: dict, path: Path) -> model.JwtAuthorizerConfig | None:
        from edgeplane.policies.jwt.jwks import JwksError, parse_jwks

        aud = spec.get("audience")
        audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
        algorithms = tuple(spec.get("algorithms") or ("RS256",))
        jwks = spec.get("jwks") if isinstance(spec.get("jwks"), dict) else {}
        secret = spec.get("hs_secret") if isinstance(spec.get("hs_secret"), dict) else {}
        hs = [a for a in algorithms if a.startswith("HS")]
        asym = [a for a in algorithms if not a.startswith("HS")]
        if asym and not jwks:
            self.fail(path, f"missing 'jwks' (file or url): needed for {', '.join(asym)}")
        if hs and not secret:
            self.fail(path, f"missing 'hs_secret' (env or file): needed for {', '.join(hs)}")
        if jwks and ("file" in jwks) == ("url" in jwks):
            self.fail(path + ("jwks",), "give exactly one of 'file' and 'url'")
        if isinstance(jwks.get("url"), str):
            from edgeplane.policies.jwt.jwks_source import split_url

            try:
                split_url(jwks["url"])
            except ValueError as exc:
                self.fail(path + ("jwks", "url"), str(exc))
        if isinstance(jwks.get("file"), str):
            try:
                with open(jwks["file"], "rb") as fh:
                    parse_jwks(fh.read())
            except OSError as exc:
                self.fail(path + ("jwks", "file"), f"cannot read: {exc.strerror or exc}")
            except JwksError as exc:
                self.fail(path + ("jwks", "file"), f"invalid JWKS: {exc}")
        if secret and ("env" in secret) == ("file" in secret):
            self.fail(path + ("hs_secret",), "give exactly one of 'env' and 'file'")
        elif isinstance(secret.get("env"), str) and not os.environ.get(secret["env"]):
            self.fail(path + ("hs_secret", "env"), f"environment variable {secret['env']} is not set")
        elif isinstance(secret.get("file"), str) and not os.path.isfile(secret["file"]):
            self.fail(path + ("hs_secret", "file"), f"no such file: {secret['file']}")
        cache = spec.get("cache") if isinstance(spec.get("cache"), dict) else {}
        issuer = spec.get("issuer")
        if not isinstance(issuer, str) or not audiences:
            return None
        cfg = model.JwtAuthorizerConfig(
            name=name, issuer=issuer, audiences=audiences, algorithms=algorithms,
            identity_source=spec.get("identity_source", "$request.header.Authorization"),
            jwks_file=jwks.get("file"), jwks_url=jwks.get("url"),
            jwks_refresh=self.duration(jwks, "refresh", path + ("jwks",), 300.0),
            hs_secret_env=secret.get("env"), hs_secret_file=secret.get("file"),
            leeway=self.duration(spec, "leeway", path, 0.0, low_inclusive=True),
            max_token_bytes=self.size(spec, "max_token_bytes", path, 8192, low=256),
            cache_ttl=self.duration(cache, "ttl", path + ("cache",), 300.0, low_inclusive=True),
            cache_max_entries=self.integer(cache, "max_entries", 10_000),
        )
        if not self.errors:
            from edgeplane.routing.chain import jwt_config

            try:
                jwt_config(cfg)
            except (ValueError, OSError) as exc:
                self.fail(path, str(exc))
        return cfg

    def integration(self, spec: Any, path: Path, parsed: ParsedKey | None,
                    upstream_names: list[str]) -> model.Integration | None:
        if not isinstance(spec, dict):
            return None
        kind = spec.get("type")
        if kind == "http":
            return self.http_integration(spec, path, parsed, upstream_names)
        if kind == "mock":
            return self.mock_integration(spec, path)
        return None

    def known_upstream(self, upstream: Any, path: Path, upstream_names: list[str]) -> None:
        if isinstance(upstream, str) and upstream not in upstream_names:
            known = ", ".join(sorted(upstream_names)) if upstream_names else "none are defined"
            msg = f"unknown upstream {upstream!r} (known: {known})"
            close = difflib.get_close_matches(upstream, upstream_names, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            self.fail(path, msg)

    def http_integration(self, spec: dict, path: Path, parsed: ParsedKey | None,
                         upstream_names: list[str]) -> model.Integration:
        upstream = spec.get("upstream")
        self.known_upstream(upstream, path + ("upstream",), upstream_names)
        template = spec.get("path")
        if isinstance(template, str):
            self.check_template(template, path + ("path",), parsed)
        else:
            template = None
        timeout = self.duration(spec, "timeout", path, 29.0, low=_INTEGRATION_TIMEOUT_MIN,
                                high=_INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
        preserve = spec.get("preserve_host", False)
        return model.Integration(
            type="http",
            upstream=upstream if isinstance(upstream, str) else None,
            path=template,
            timeout=timeout,
            preserve_host=preserve if isinstance(preserve, bool) else False,
        )

    def check_template(self, template: str, path: Path, parsed: ParsedKey | None) -> None:
        if not template.startswith("/"):
            self.fail(path, f"path template {template!r} must start with '/'")
            return
        bad = next((ch for ch in template if ch in "?# " or not ch.isprintable() or not ch.isascii()), None)
        if bad is not None:
            self.fail(path, f"path template {template!r} contains {bad!r}: only a path is "
                            "allowed (printable ASCII, no query, fragment or spaces)")
            return
        if _TEMPLATE_PARAM_RE.sub("", template).count("{") or _TEMPLATE_PARAM_RE.sub("", template).count("}"):
            self.fail(path, f"path template {template!r} has an unbalanced '{{' or '}}'")
            return
        defined = parsed.param_names if parsed is not None else None
        for name in _TEMPLATE_PARAM_RE.findall(template):
            if name.endswith("+"):
                self.fail(path, f"write {{{name[:-1]}}} in a path template, not {{{name}}}")
                continue
            if defined is None:
                continue  # the route key is invalid: reported already
            if name not in defined:
                if defined:
                    have = ", ".join("{" + n + "}" for n in defined)
                    self.fail(path, f"unknown parameter {{{name}}}: route {parsed.key!r} "  # type: ignore[union-attr]
                                    f"defines {have}")
                else:
                    self.fail(path, f"unknown parameter {{{name}}}: route {parsed.key!r} "  # type: ignore[union-attr]
                                    "defines no parameters")

    def mock_integration(self, spec: dict, path: Path) -> model.Integration:
        status = self.integer(spec, "status", 200)
        body_value = spec.get("body")
        body = b""
        default_type = "application/json"
        if isinstance(body_value, (dict, list)):
            try:
                body = orjson.dumps(body_value)
            except (TypeError, orjson.JSONEncodeError) as exc:
                self.fail(path + ("body",), f"cannot be serialised as JSON: {exc}")
        elif isinstance(body_value, str):
            try:
                body = body_value.encode("utf-8")
            except UnicodeEncodeError as exc:
                self.fail(path + ("body",), f"cannot be encoded as UTF-8: {exc}")
            default_type = "text/plain; charset=utf-8"
        if body and status in _BODYLESS_STATUSES:
            self.fail(path + ("body",), f"a {status} response has no body")
        content_type = spec.get("content_type", default_type)
        if not isinstance(content_type, str):
            content_type = default_type
        elif not content_type.strip() or not _is_header_value(content_type):
            self.fail(path + ("content_type",), f"invalid content type {content_type!r}")
        headers = self.mock_headers(spec.get("headers"), path + ("headers",))
        return model.Integration(type="mock", status=status, body=body,
                                 content_type=content_type, headers=headers)

    def mock_headers(self, section: Any, path: Path) -> tuple[tuple[str, str], ...]:
        if not isinstance(section, dict):
            return ()
        out: list[tuple[str, str]] = []
        for name, value in section.items():
            if not isinstance(name, str) or not _TOKEN_RE.match(name):
                self.fail(path, f"invalid header name {_short(name)}")
                continue
            lower = name.lower()
            if lower == "content-type":
                self.fail(path + (name,), "set the content type with integration.content_type")
                continue
            if lower in _MANAGED_HEADERS:
                self.fail(path + (name,), f"header {name!r} is managed by the gateway")
                continue
            if not isinstance(value, str):
                continue
            if not _is_header_value(value):
                self.fail(path + (name,), f"invalid header value {_short(value)} "
                                          "(no control characters or line breaks)")
                continue
            out.append((name, value))
        return tuple(out)

    def limits(self, raw: dict) -> model.Limits:
        section = raw.get("limits")
        if not isinstance(section, dict):
            return model.Limits()
        d, p = model.Limits(), ("limits",)
        return model.Limits(
            max_head_bytes=self.size(section, "max_head_bytes", p, d.max_head_bytes, low=256),
            max_headers=self.integer(section, "max_headers", d.max_headers),
            max_body_bytes=self.size(section, "max_body_bytes", p, d.max_body_bytes),
            head_timeout=self.duration(section, "head_timeout", p, d.head_timeout),
            body_timeout=self.duration(section, "body_timeout", p, d.body_timeout),
            keepalive_timeout=self.duration(section, "keepalive_timeout", p, d.keepalive_timeout),
            send_timeout=self.duration(section, "send_timeout", p, d.send_timeout),
            max_pipelined=self.integer(section, "max_pipelined", d.max_pipelined),
        )

    def access_log(self, raw: dict) -> model.AccessLogConfig:
        section = raw.get("access_log")
        if not isinstance(section, dict):
            return model.AccessLogConfig()
        d, p = model.AccessLogConfig(), ("access_log",)
        destination = section.get("destination", d.destination)
        if destination is False:  # YAML 1.1 reads a bare `off` as false
            destination = "off"
        if destination not in ("stdout", "stderr", "file", "off"):
            destination = d.destination
        log_path = section.get("path")
        if not isinstance(log_path, str):
            log_path = None
        if destination == "file" and "path" not in section:
            self.fail(p, "missing required key 'path' (destination is 'file')")
        elif destination == "file" and log_path is not None and not log_path.strip():
            self.fail(p + ("path",), "must not be empty")
        elif destination != "file" and "path" in section:
            self.fail(p + ("path",), f"only used with destination 'file' (destination is {destination!r})")
        return model.AccessLogConfig(
            destination=destination,
            path=log_path if destination == "file" else None,
            flush_interval=self.duration(section, "flush_interval", p, d.flush_interval),
            buffer_bytes=self.size(section, "buffer_bytes", p, d.buffer_bytes, low=1),
        )

    # -- WebSockets --------------------------------------------------------------
    def websocket_limits(self, section: dict, path: Path,
                         base: model.WebSocketLimits) -> model.WebSocketLimits:
        """A `websocket:`-shaped mapping; keys it does not set keep `base`'s values."""
        size = self.size(section, "max_message_bytes", path, base.max_message_bytes, low=1)
        if size > _WS_MAX_MESSAGE:
            self.fail(path + ("max_message_bytes",), f"must be at most 16MiB ({_WS_MAX_MESSAGE} bytes), "
                                                     f"got {_short(section['max_message_bytes'])}")
        frame = self.size(section, "max_frame_bytes", path, base.max_frame_bytes, low=1)
        if frame > _WS_MAX_MESSAGE:
            self.fail(path + ("max_frame_bytes",), f"must be at most 16MiB ({_WS_MAX_MESSAGE} bytes), "
                                                   f"got {_short(section['max_frame_bytes'])}")
        rate = section.get("messages_per_second", base.messages_per_second)
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
            rate = base.messages_per_second if rate is not None else None
        elif rate > _MAX_THROTTLE:
            self.fail(path + ("messages_per_second",), f"must be <= {_MAX_THROTTLE:,} (got {_short(rate)})")
        conn_rate = section.get("connections_per_second", base.connections_per_second)
        if not isinstance(conn_rate, (int, float)) or isinstance(conn_rate, bool) or conn_rate <= 0:
            conn_rate = base.connections_per_second
        elif conn_rate > _MAX_THROTTLE:
            self.fail(path + ("connections_per_second",), f"must be <= {_MAX_THROTTLE:,} (got {_short(conn_rate)})")
        burst = self.integer(section, "message_burst", base.message_burst)
        if burst > _MAX_THROTTLE:
            self.fail(path + ("message_burst",), f"must be <= {_MAX_THROTTLE:,} (got {burst})")
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
                    if r.path == api.path and _hosts_overlap(r.host, api.host):
                        self.fail(where, f"{api.path!r} clashes with routes[{r.index}] ({r.key!r}): the "
                                         "WebSocket API would take every request for that path")
                        break
            seen.append((name, api.path, api.host))
            out[name] = api
        return out

    def websocket_api(self, name: str, spec: dict, path: Path,
                      upstream_names: list[str]) -> model.WebSocketApiConfig | None:
        from edgeplane.websocket.api import parse_selection

        api_path = spec.get("path")
        ok = isinstance(api_path, str)
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
                host = _normalize_route_host(spec["host"])
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
        limits = self.ws_defaults
        if isinstance(spec.get("limits"), dict):
            limits = self.websocket_limits(spec["limits"], path + ("limits",), self.ws_defaults)
        if not ok:
            return None
        return model.WebSocketApiConfig(name=name, path=api_path, host=host, route_selection=selection,
                                        routes=routes, limits=limits)

    def websocket_route(self, key: str, spec: dict, path: Path, api_path: str,
                        upstream_names: list[str]) -> model.WebSocketRouteConfig | None:
        from edgeplane.websocket.api import check_route_key

        problem = check_route_key(key)
        if problem is not None:
            self.fail(path, problem)
        special = key in ("$connect", "$disconnect")
        integ_spec = spec.get("integration")
        integration = None
        if isinstance(integ_spec, dict):
            ip = path + ("integration",)
            upstream = integ_spec.get("upstream")
            self.known_upstream(upstream, ip + ("upstream",), upstream_names)
            target = integ_spec.get("path", api_path)
            if isinstance(target, str):
                bad = next((ch for ch in target if ch in "?#{} " or not ch.isprintable() or not ch.isascii()), None)
                if not target.startswith("/"):
                    self.fail(ip + ("path",), f"path {target!r} must start with '/'")
                elif bad is not None:
                    self.fail(ip + ("path",), f"path {target!r} contains {bad!r}: a literal path is "
                                              "expected (printable ASCII, no query, fragment, braces or spaces)")
            timeout = self.duration(integ_spec, "timeout", ip, 29.0, low=_INTEGRATION_TIMEOUT_MIN,
                                    high=_INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
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
            elif auth not in self.authorizer_names:
                known = ", ".join(sorted(self.authorizer_names)) or "none defined"
                self.fail(path + ("auth",), f"unknown authorizer {auth!r} (known: {known})")
        else:
            auth = None
        scopes = tuple(x for x in spec.get("scopes") or () if isinstance(x, str))
        if scopes and key != "$connect":
            self.fail(path + ("scopes",), "scopes belong to the $connect route (with a JWT authorizer)")
        elif scopes and auth is None:
            self.fail(path + ("scopes",), "scopes need a JWT authorizer ('auth')")
        elif scopes and auth in self.api_key_authorizers:
            self.fail(path + ("scopes",), f"{auth!r} is not a JWT authorizer: scopes need a JWT authorizer")
        ret = spec.get("return_response", False)
        if ret is True and special:
            self.fail(path + ("return_response",), f"{key} cannot answer the client with a message "
                                                   "(only message routes can)")
        return model.WebSocketRouteConfig(key=key, integration=integration, auth=auth, scopes=scopes,
                                          return_response=ret is True)


def _build(raw: dict[str, Any], source: str, errors: _Errors) -> model.Config | None:
    b = _Builder(errors)
    listen = b.listen(raw)
    admin = b.admin(raw, listen)
    taken: list[tuple[Path, model.ListenAddress]] = [
        ((("listen", i) if isinstance(raw.get("listen"), list) else ("listen",)), a)
        for i, a in enumerate(listen)]
    if admin.listen is not None:
        taken.append((("admin", "listen"), admin.listen))
    tls = b.tls(raw, taken)
    upstreams = b.upstreams(raw)
    b.plan_names = set(raw["usage_plans"]) if isinstance(raw.get("usage_plans"), dict) else set()
    authorizers = b.authorizers(raw)
    ip_rules = b.ip_rules(raw.get("ip_rules"), ("ip_rules",))
    trusted = b.trusted_proxies(raw)
    cors = b.cors(raw.get("cors"), ("cors",))
    throttle = b.throttle(raw.get("throttle"), ("throttle",), route_level=False)
    plans = b.usage_plans(raw)
    names = [n for n in (raw.get("upstreams") or {}) if isinstance(n, str)] \
        if isinstance(raw.get("upstreams"), dict) else []
    if isinstance(raw.get("websocket"), dict):
        b.ws_defaults = b.websocket_limits(raw["websocket"], ("websocket",), model.WebSocketLimits())
    routes = b.routes(raw, names)
    ws_apis = b.websocket_apis(raw, names, routes)
    kinds = _authorizer_kinds(raw)
    _check_throttle_keys(b, kinds, routes)
    _check_plan_routes(b, kinds, plans, routes)
    cluster = b.cluster(raw)
    limits = b.limits(raw)
    access_log = b.access_log(raw)
    drain = b.duration(raw, "drain_timeout", (), 30.0, low_inclusive=True)
    if errors:
        return None
    http = raw.get("http") or {}
    return model.Config(
        listen=listen,
        workers=raw.get("workers", 1),
        parser=http.get("parser", "httptools"),
        admin=admin,
        upstreams=upstreams,
        routes=routes,
        limits=limits,
        access_log=access_log,
        drain_timeout=drain,
        log_level=raw.get("log_level", "info"),
        authorizers=authorizers,
        ip_rules=ip_rules,
        trusted_proxies=trusted,
        cors=cors,
        tls=tls,
        throttle=throttle,
        usage_plans=plans,
        data_dir=raw.get("data_dir", "data"),
        cluster=cluster,
        websocket=b.ws_defaults,
        websocket_apis=ws_apis,
        source=source,
        raw=raw,
    )


# ---------------------------------------------------------------------------
# small helpers

_MAX_THROTTLE = 1_000_000_000  # requests/s and bucket size
_WS_MAX_MESSAGE = 16 * 1024 * 1024


def _hosts_overlap(a: str | None, b: str | None) -> bool:
    """Whether some Host header can match both route hosts (None = any host)."""
    if a is None or b is None or a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if x.startswith("*.") and y.removeprefix("*.").endswith(x[1:]):
            return True
    return False


def _authorizer_kinds(raw: dict) -> dict[str, Any]:
    """Authorizer name -> its `type` as written (also for authorizers with errors)."""
    section = raw.get("authorizers")
    if not isinstance(section, dict):
        return {}
    return {n: a.get("type") for n, a in section.items() if isinstance(a, dict)}


def _check_plan_routes(b: _Builder, kinds: dict[str, Any], plans: dict[str, model.UsagePlanConfig],
                       routes: tuple[model.RouteConfig, ...]) -> None:
    """A plan's per-route throttle must name a route guarded by an API-key authorizer
    (else no request could ever carry the plan there)."""
    by_key = {r.key: r for r in routes}
    for name, plan in plans.items():
        for key in plan.route_throttles:
            path = ("usage_plans", name, "routes", key)
            route = by_key.get(key)
            if route is None:
                close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)
                b.fail(path, "no route has this key" + (f"; did you mean {close[0]!r}?" if close else ""))
            elif kinds.get(route.auth) != "api_key":
                b.fail(path, "the route has no api_key authorizer, so no request there carries a plan")


def _check_throttle_keys(b: _Builder, kinds: dict[str, Any], routes: tuple[model.RouteConfig, ...]) -> None:
    """Per-client keys that can never resolve on their route are refused, not left to
    fall silently into the shared bucket."""
    for r in routes:
        key = r.throttle.key if r.throttle is not None else None
        kind = kinds.get(r.auth) if r.auth else None
        if key == "$context.identity.apiKeyId" and kind != "api_key":
            b.fail(("routes", r.index, "throttle", "key"),
                   f"{key} never resolves here: the route has no api_key authorizer")
        elif key is not None and key.startswith("$context.authorizer.claims.") and kind != "jwt":
            b.fail(("routes", r.index, "throttle", "key"),
                   f"{key} never resolves here: claims come from a jwt authorizer and the route has none")


def _collides(a: model.ListenAddress, b: model.ListenAddress) -> bool:
    """Two listeners that cannot both bind: same non-zero port and overlapping hosts."""
    if a.port == 0 or a.port != b.port:
        return False
    ha, hb = a.host.lower(), b.host.lower()
    return ha == hb or "::" in (ha, hb) or (
        "0.0.0.0" in (ha, hb) and ":" not in ha + hb  # IPv4 wildcard vs an IPv4/name host
    )


def _fmt_addr(addr: model.ListenAddress) -> str:
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _is_header_value(value: str) -> bool:
    """Printable ASCII and tabs: no CR, LF, NUL or other control characters."""
    return all(ch == "\t" or " " <= ch <= "~" for ch in value)
