"""Config errors for humans: jsonschema's findings rewritten, both passes merged.

Owns `Errors`, the collector both passes write to, and `humanize`, which turns one
jsonschema `ValidationError` into located messages ("unknown key 'upstreamz', did you
mean 'upstream'?"). When both passes flag the same value's format, the more specific
semantic message is kept.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from jsonschema.exceptions import ValidationError

from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short
from edgeplane.config.values import EXPECTED

Path = tuple[Any, ...]

_JSON_TYPE_NAMES = {"object": "mapping", "array": "list", "string": "string",
                    "integer": "integer", "number": "number", "boolean": "boolean",
                    "null": "null"}



@dataclass
class Errors:
    schema: list[tuple[Path, str, bool]] = field(default_factory=list)  # (path, msg, replaceable)
    semantic: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, msg: str) -> None:
        self.semantic.append((path, msg))

    def __bool__(self) -> bool:
        return bool(self.schema or self.semantic)

    def located(self) -> list[tuple[Path, str]]:
        """Every problem once, sorted by location (stable: pass order per path)."""
        semantic_locs = {p for p, _ in self.semantic}
        items = [(p, m) for p, m, repl in self.schema if not (repl and p in semantic_locs)]
        items += self.semantic
        suggested = {(p, m.rsplit("did you mean ", 1)[1].rstrip("?"))
                     for p, m in items if m.startswith("unknown key") and "did you mean" in m}
        items = [(p, m) for p, m in items
                 if not (m.startswith("missing required key ") and (p, m[21:]) in suggested)]
        items.sort(key=lambda pm: path_sort_key(pm[0]))
        out: list[tuple[Path, str]] = []
        for item in items:
            if item not in out:
                out.append(item)
        return out

    def formatted(self) -> list[str]:
        return [f"{loc(p)}: {m}" for p, m in self.located()]


def humanize(err: ValidationError) -> list[tuple[Path, str, bool]]:
    path = tuple(err.absolute_path)
    v, value, inst = err.validator, err.validator_value, err.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties", {}))
        out: list[tuple[Path, str, bool]] = []
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
            out = []
            for e in deep:
                out.extend(humanize(e))
            return out
        expected = EXPECTED.get(err.schema.get("title", ""))
        if expected:
            return [(path, f"expected {expected}, got {_describe(inst)}", True)]
    return [(path, err.message, False)]


def _type_names(types: str | list[str]) -> str:
    names = [_JSON_TYPE_NAMES.get(t, t) for t in ([types] if isinstance(types, str) else types)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def loc(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def path_sort_key(path: Path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)

