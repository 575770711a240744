"""Config errors for humans: jsonschema's findings rewritten, every pass's errors merged.

Owns `Errors`, the collector every pass writes to, and `humanize`, which turns one
jsonschema `ValidationError` into located messages ("unknown key 'upstreamz', did you
mean 'upstream'?"), and `loc`/`display`, the text of a location.

One mistake gives one error. Each error records the pass (stage) that found it: ENV
(`${VAR}` substitution), SCHEMA (pass 1), LOAD (the section loaders of pass 2), CHECK
(the policies' `check`, which reason across sections over the built config). When
`located()` lists them, an error is dropped as a follow-on of an earlier stage's error:

1. at the same path, a SCHEMA message marked replaceable (a range or format complaint)
   gives way to the later, more specific message;
2. at the same path as an ENV error: the value there is still the unsubstituted text;
3. at a mapping, when the message names a key of that mapping whose value an earlier
   stage refused (``routes[0].throttle: rate must be a number`` after
   ``routes[0].throttle.rate: expected number``): the loader judged the mapping from
   the refused value;
4. a CHECK error inside a list item (``routes[1].throttle.key``) that already has an
   earlier error anywhere (``routes[1].auth: unknown authorizer``), or, outside any
   list, at or below a path that has one: a check reasons from the whole item;
5. a CHECK error at a path that names a route by its key
   (``usage_plans.gold.routes.GET /b``) when that route has an earlier error.

Independent mistakes are all still listed, each once, sorted by location.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from jsonschema.exceptions import ValidationError

from edgeplane.config.errors import describe as _describe
from edgeplane.config.errors import short as _short
from edgeplane.config.values import EXPECTED

Path = tuple[Any, ...]

ENV, SCHEMA, LOAD, CHECK = range(4)  # the stages of one load, in order

_JSON_TYPE_NAMES = {"object": "mapping", "array": "list", "string": "string",
                    "integer": "integer", "number": "number", "boolean": "boolean",
                    "null": "null"}


class Finding(NamedTuple):
    """One error: where (`path`), what, the stage that found it, whether a later
    message at the same path replaces it, and `at`: the path whose line locates it
    (an unknown key's own line rather than its mapping's)."""

    path: Path
    msg: str
    stage: int = LOAD
    replaceable: bool = False
    at: Path | None = None


@dataclass
class Errors:
    """The findings of one load, in the order found. `add` (what `LoadContext.fail`
    calls) records the current `stage`; `located` lists them without follow-ons."""

    findings: list[Finding] = field(default_factory=list)
    stage: int = LOAD  # the stage `add` records; the loader moves it along

    def add(self, path: Path, msg: str) -> None:
        self.findings.append(Finding(path, msg, self.stage))

    def extend(self, findings: Iterable[Finding]) -> None:
        self.findings.extend(findings)

    def __bool__(self) -> bool:
        return bool(self.findings)

    def located(self, route_keys: Mapping[str, Iterable[int]] | None = None) -> list[Finding]:
        """Every problem once, follow-ons dropped (see the module docstring), sorted by
        location (stable: stage order per path). `route_keys`: route key -> the indexes
        of the routes with that key (rule 5)."""
        items = self.findings
        later = {f.path for f in items if f.stage > SCHEMA}
        env = {f.path for f in items if f.stage == ENV}
        suggested = {(f.path, f.msg.rsplit("did you mean ", 1)[1].rstrip("?"))
                     for f in items if f.msg.startswith("unknown key") and "did you mean" in f.msg}
        out: list[Finding] = []
        seen: set[tuple[Path, str]] = set()
        for f in sorted(items, key=lambda f: (path_sort_key(f.path), f.stage)):
            if (f.path, f.msg) in seen:
                continue
            if f.replaceable and f.stage == SCHEMA and f.path in later:
                continue
            if f.msg.startswith("missing required key ") and (f.path, f.msg[21:]) in suggested:
                continue
            if f.stage > ENV and f.path in env:
                continue
            if self._follow_on(f, route_keys or {}):
                continue
            seen.add((f.path, f.msg))
            out.append(f)
        return out

    def _follow_on(self, f: Finding, route_keys: Mapping[str, Iterable[int]]) -> bool:
        earlier = [e for e in self.findings if e.stage < f.stage]
        if not earlier:
            return False
        for e in earlier:  # rule 3
            if (len(e.path) == len(f.path) + 1 and e.path[:-1] == f.path and isinstance(e.path[-1], str)
                    and re.search(rf"(?<![\w-]){re.escape(e.path[-1])}(?![\w-])", f.msg)):
                return True
        if f.stage != CHECK:
            return False
        first_index = next((i for i, part in enumerate(f.path) if isinstance(part, int)), None)
        scope = f.path if first_index is None else f.path[: first_index + 1]
        if any(e.path[: len(scope)] == scope for e in earlier):  # rule 4
            return True
        named = {i for part in f.path if isinstance(part, str) for i in route_keys.get(part, ())}
        return any(e.path[:2] in {("routes", i) for i in named} for e in earlier)  # rule 5

    def formatted(self) -> list[str]:
        return [f"{loc(f.path)}: {f.msg}" for f in self.located()]


def humanize(err: ValidationError) -> list[Finding]:
    """One jsonschema finding as SCHEMA-stage `Finding`s."""
    path = tuple(err.absolute_path)
    v, value, inst = err.validator, err.validator_value, err.instance
    if v == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties", {}))
        out: list[Finding] = []
        for k in inst:
            if k in allowed:
                continue
            msg = f"unknown key {str(k)!r}"
            close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6)
            if close:
                msg += f", did you mean {close[0]!r}?"
            elif allowed:
                msg += f" (allowed: {', '.join(allowed)})"
            out.append(Finding(path, msg, SCHEMA, False, path + (k,)))
        return out
    if v == "required" and isinstance(inst, dict):
        return [Finding(path, f"missing required key {k!r}", SCHEMA) for k in value if k not in inst]
    if v == "type":
        return [Finding(path, f"expected {_type_names(value)}, got {_describe(inst)}", SCHEMA, False)]
    if v == "enum":
        shown = [x for x in value if not isinstance(x, bool)] or list(value)  # hide the `off` alias
        msg = f"{_short(inst)} is not one of {', '.join(repr(x) for x in shown)}"
        if isinstance(inst, str):
            close = difflib.get_close_matches(inst, [str(x) for x in value], n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        return [Finding(path, msg, SCHEMA, False)]
    if v == "const":
        return [Finding(path, f"expected {value!r}, got {_describe(inst)}", SCHEMA, False)]
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return [Finding(path, f"must be {op} {value}, got {_short(inst)}", SCHEMA, True)]
    if v == "minProperties":
        return [Finding(path, "must not be empty" if value == 1 else f"needs at least {value} entries", SCHEMA)]
    if v == "minItems":
        return [Finding(path, "must not be empty" if value == 1 else f"needs at least {value} items", SCHEMA)]
    if v == "pattern" and "propertyNames" in err.schema_path:
        return [Finding(path, f"invalid name {_short(inst)}: use letters, digits, '_' and '-', "
                              "starting with a letter or '_'", SCHEMA)]
    if v == "pattern":
        return [Finding(path, f"{_short(inst)} is not in the expected format", SCHEMA, True)]
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
            return [Finding(path, f"expected {expected}, got {_describe(inst)}", SCHEMA, True)]
    return [Finding(path, err.message, SCHEMA, False)]


def _type_names(types: str | list[str]) -> str:
    names = [_JSON_TYPE_NAMES.get(t, t) for t in ([types] if isinstance(types, str) else types)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def loc(path: Path) -> str:
    """``routes[2].integration.timeout``; ``(root)`` for the empty path."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def display(path: Path, raw: Any) -> str:
    """`loc(path)` as people read it: a route is also named by its key, taken from the
    document `raw` (``routes[2] (GET /users/{id}).integration.timeout``)."""
    routes = raw.get("routes") if isinstance(raw, dict) else None
    if len(path) < 2 or path[0] != "routes" or not isinstance(path[1], int) or not isinstance(routes, list):
        return loc(path)
    spec = routes[path[1]] if 0 <= path[1] < len(routes) else None
    key = spec.get("route") if isinstance(spec, dict) else None
    if not isinstance(key, str):
        return loc(path)
    rest = loc(path[2:]) if len(path) > 2 else ""
    return f"{loc(path[:2])} ({key})" + ("" if not rest else rest if rest.startswith("[") else "." + rest)


def path_sort_key(path: Path) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)

