"""`LoadContext`: what a config section's loader gets, built-in or plugin.

Owns the error collector of one load and the generic value readers every section
shares (durations, sizes, integers, upstream references), so a plugin's loader reports
problems exactly as the core does: `ctx.fail(path, message)` with a path into the file
(`("routes", 2, "throttle", "rate")`). Readers skip values of the wrong type silently:
the schema pass reported them already. It also carries what later sections need to
know about earlier ones: `raw` (the whole file), `upstream_names`, `authorizer_types`
(authorizer name -> its type as written), and `websocket_defaults`.

File paths: every path-valued key goes through `resolve_paths` (or `path`), so a
relative path means the same file wherever the gateway is started: it resolves against
`base_dir`, the folder of the config file (a config read from a dict, a string or stdin
has none and keeps paths as written: relative to the current directory). The resolved
path is written back into `raw`, so `Config.raw` names every file absolutely and a
worker that loads it as a dict, from any directory, reads the same files.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from typing import Any

from edgeplane.config import model
from edgeplane.config.errors import short as _short
from edgeplane.config.humanize import Errors, Path
from edgeplane.config.values import (
    HTTP_INTEGRATION_TIMEOUT_MAX,
    INTEGRATION_TIMEOUT_MAX,
    INTEGRATION_TIMEOUT_MIN,
    fmt_seconds,
    parse_duration,
    parse_size,
)

__all__ = ["LoadContext", "Path"]

log = logging.getLogger("edgeplane.config")


class LoadContext:
    """Shared by every section of one load; only used when no error at all was found."""

    def __init__(self, raw: dict[str, Any], errors: Errors, registry: Any,
                 base_dir: str | None = None) -> None:
        self.raw = raw
        self.errors = errors
        self.registry = registry
        self.base_dir = base_dir  # the config file's folder (absolute); None: as written
        upstreams = raw.get("upstreams")
        self.upstream_names: list[str] = [n for n in upstreams if isinstance(n, str)] \
            if isinstance(upstreams, dict) else []
        section = raw.get("authorizers")
        self.authorizer_types: dict[str, Any] = {
            n: a.get("type") for n, a in section.items() if isinstance(n, str) and isinstance(a, dict)
        } if isinstance(section, dict) else {}
        self.websocket_defaults = model.WebSocketLimits()  # the top-level `websocket:` section
        self.warnings: list[tuple[Path, str]] = []  # (location, message), see `warn`

    def call_plugin(self, unit: Any, path: Path, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a plugin's loader or check; an exception in it (a bug in the plugin, or a
        value it did not expect) is a located error naming the plugin, and its
        traceback is logged, instead of a crash of the whole load."""
        try:
            return fn(*args)
        except Exception as exc:
            name = getattr(unit, "name", None) or getattr(unit, "type", None) or type(unit).__name__
            log.error("config: plugin %r failed at %s", name, path or "(root)", exc_info=True)
            self.fail(path, f"plugin {name!r} failed on this value: {type(exc).__name__}: {exc}")
            return None

    def path(self, value: str) -> str:
        """A file path from the config: relative ones resolve against the config file's
        folder. Empty text stays empty (the loader that reads it reports it)."""
        if self.base_dir is None or not value or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(self.base_dir, value))

    def resolve_paths(self, section: Any, *keys: str | tuple[str, ...]) -> None:
        """Rewrite in place each of `keys` of `section` (a mapping inside `raw`; a key
        may be a tuple reaching into nested mappings: ("jwks", "file")) that holds a
        string, as `path` resolves it. Values of another type are left for the schema."""
        if not isinstance(section, dict):
            return
        for key in keys:
            parts = (key,) if isinstance(key, str) else key
            target: Any = section
            for part in parts[:-1]:
                target = target.get(part) if isinstance(target, dict) else None
            if isinstance(target, dict) and isinstance(target.get(parts[-1]), str):
                target[parts[-1]] = self.path(target[parts[-1]])

    def fail(self, path: Path, msg: str) -> None:
        self.errors.add(path, msg)

    def warn(self, path: Path, msg: str) -> None:
        """A valid but risky setting: `validate` prints it, `serve` logs it at start."""
        self.warnings.append((path, msg))

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
            bound = f">= {fmt_seconds(low)}" if low_inclusive else f"> {fmt_seconds(low)}"
            self.fail(path + (key,), f"must be {bound}, got {_short(value)}")
        elif high is not None and seconds > high:
            self.fail(path + (key,), f"must be <= {fmt_seconds(high)}, got {_short(value)}")
        return seconds

    def integration_timeout(self, section: dict, path: Path, advice: str = "") -> float:
        """An integration's `timeout` (default 29 s): 50ms..24h, with a warning past
        Amazon API Gateway's 30 s (`advice` continues it)."""
        timeout = self.duration(section, "timeout", path, 29.0, low=INTEGRATION_TIMEOUT_MIN,
                                high=HTTP_INTEGRATION_TIMEOUT_MAX, low_inclusive=True)
        if timeout > INTEGRATION_TIMEOUT_MAX:
            self.warn(path + ("timeout",), f"{timeout:g}s is past Amazon API Gateway's {INTEGRATION_TIMEOUT_MAX:g} s "
                                           f"integration limit{advice}")
        return timeout

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


    def known_upstream(self, upstream: Any, path: Path, upstream_names: list[str]) -> None:
        if isinstance(upstream, str) and upstream not in upstream_names:
            known = ", ".join(sorted(upstream_names)) if upstream_names else "none are defined"
            self.fail(path, f"unknown upstream {upstream!r} (known: {known})"
                            + _did_you_mean(upstream, upstream_names))

    def known_authorizer(self, auth: str, path: Path) -> bool:
        """Whether `auth` names an authorizer; if not, a located error with the names
        there are and the closest one."""
        names = list(self.authorizer_types)
        if auth in self.authorizer_types:
            return True
        known = ", ".join(sorted(names)) or "none defined"
        self.fail(path, f"unknown authorizer {auth!r} (known: {known})" + _did_you_mean(auth, names))
        return False


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""

