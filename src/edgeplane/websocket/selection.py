"""Route selection of WebSocket APIs: which route a message goes to (sans-IO).

Owns AWS's `route_selection` expressions (`$request.body.action`,
`${request.body.a}/${request.body.b}`), evaluated against a message's JSON body, and the
syntax of route keys (`$connect`, `$disconnect`, `$default`, or a selected key).
A message that is not JSON, lacks the field, or selects a non-scalar goes to `$default`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_NAME = r"[A-Za-z0-9_\-]+"
_PATH = rf"{_NAME}(?:\.{_NAME})*"
_SIMPLE_RE = re.compile(rf"^\$request\.body\.({_PATH})$")
_PART_RE = re.compile(r"\$\{([^{}]*)\}")
_FIELD_RE = re.compile(rf"^request\.body\.({_PATH})$")
_EXPECTED = ("expected '$request.body.NAME' (NAME may be a dotted path such as 'a.b') or a "
             "template such as '${request.body.service}/${request.body.action}'")
_MAX_KEY = 128


class Selector:
    """A compiled route selection expression: literal strings and field paths."""

    __slots__ = ("parts", "expression", "single")

    def __init__(self, expression: str, parts: tuple[str | tuple[str, ...], ...]) -> None:
        self.expression = expression
        self.parts = parts  # str = literal text, tuple = a path into the JSON body
        self.single = parts[0] if len(parts) == 1 and isinstance(parts[0], tuple) else None

    def select(self, message: str | bytes) -> str | None:
        """The route key `message` selects, or None (then `$default` answers it)."""
        try:
            body = orjson.loads(message)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        if self.single is not None:
            key = _text(_lookup(body, self.single))
        else:
            out = []
            for part in self.parts:
                if isinstance(part, str):
                    out.append(part)
                    continue
                value = _text(_lookup(body, part))
                if value is None:
                    return None
                out.append(value)
            key = "".join(out)
        if not key or key[0] == "$":
            return None
        return key


def _lookup(body: dict, path: tuple[str, ...]) -> Any:
    value: Any = body
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return orjson.dumps(value).decode()
    return None  # missing, null, an object or a list


def parse_selection(expression: Any) -> Selector:
    """Compile a route selection expression; ValueError with the reason if it is bad."""
    if not isinstance(expression, str):
        raise ValueError(f"{_EXPECTED}, got {type(expression).__name__}")
    m = _SIMPLE_RE.match(expression)
    if m is not None:
        return Selector(expression, (tuple(m.group(1).split(".")),))
    if "${" not in expression:
        why = "only $request.body fields can select a route" if expression.startswith("$") \
            else "not an expression"
        raise ValueError(f"invalid route selection expression {expression!r}: {why}; {_EXPECTED}")
    parts: list[str | tuple[str, ...]] = []
    pos = 0
    for m in _PART_RE.finditer(expression):
        if m.start() > pos:
            parts.append(_literal(expression[pos:m.start()], expression))
        inner = _FIELD_RE.match(m.group(1))
        if inner is None:
            raise ValueError(f"invalid route selection expression {expression!r}: "
                             f"'${{{m.group(1)}}}' is not a $request.body field; {_EXPECTED}")
        parts.append(tuple(inner.group(1).split(".")))
        pos = m.end()
    if pos < len(expression):
        parts.append(_literal(expression[pos:], expression))
    return Selector(expression, tuple(parts))


def _literal(text: str, expression: str) -> str:
    if any(ch in text for ch in "${}") or not text.isprintable():
        raise ValueError(f"invalid route selection expression {expression!r}: unexpected "
                         f"{text!r} between the fields (an unclosed '${{', a stray '$', brace "
                         f"or control character); {_EXPECTED}")
    return text


def check_route_key(key: str) -> str | None:
    """Why a WebSocket API route key is invalid, or None when it is fine."""
    if key in ("$connect", "$disconnect", "$default"):
        return None
    if key.startswith("$"):
        return (f"unknown special route key {key!r} (WebSocket APIs know '$connect', "
                "'$disconnect' and '$default')")
    if not key or len(key) > _MAX_KEY:
        return f"a route key has 1..{_MAX_KEY} characters"
    if not key.isprintable():
        return f"route key {key!r} contains a control character"
    return None


