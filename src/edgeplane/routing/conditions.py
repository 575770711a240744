"""Sans-IO: header and query-string conditions on a route (`routes[].match`).

Owns `Conditions`: compiled from `{headers: {NAME: VALUE | {regex: RE}}, query: {NAME:
VALUE | {regex: RE}}}`, tested against a request's header list and raw query. A header
condition holds when any of the header's values equals VALUE (or fully matches RE); a
query condition the same for the parameter's values (percent-decoded). Every condition
must hold.

Invariants: regexes are compiled once (at load); `ident` is a canonical text, equal for
equal condition sets (duplicate detection); `exclusive(other)` is True only when no
request can satisfy both (a name both test for different exact values).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus


class Condition:
    __slots__ = ("kind", "name", "exact", "regex", "raw_name")

    def __init__(self, kind: str, name: str, exact: str | None, regex: str | None) -> None:
        self.kind = kind  # "header" | "query"
        self.name = name.lower() if kind == "header" else name
        self.raw_name = self.name.encode("latin-1")
        self.exact = exact
        self.regex = re.compile(regex) if regex is not None else None  # re.error: the loader locates it

    def holds(self, values: list[str]) -> bool:
        if self.regex is not None:
            return any(self.regex.fullmatch(v) for v in values)
        return self.exact in values

    def describe(self) -> str:
        what = f"~{self.regex.pattern!r}" if self.regex is not None else f"={self.exact!r}"
        return f"{self.kind} {self.name}{what}"


class Conditions:
    __slots__ = ("items", "ident")

    def __init__(self, items: list[Condition]) -> None:
        self.items = tuple(sorted(items, key=lambda c: (c.kind, c.name)))
        self.ident = "; ".join(c.describe() for c in self.items)

    @property
    def specificity(self) -> tuple[int, int]:
        """Sorts first: more conditions, then more exact ones."""
        return (-len(self.items), -sum(1 for c in self.items if c.regex is None))

    def matches(self, req: Any) -> bool:
        query: list[tuple[str, str]] | None = None
        for c in self.items:
            if c.kind == "header":
                values = [v.decode("latin-1") for k, v in req.headers if k == c.raw_name]
            else:
                if query is None:
                    query = [(unquote_plus(k), unquote_plus(v)) for k, _, v in
                             (p.partition("=") for p in req.query.decode("latin-1").split("&") if p)]
                values = [v for k, v in query if k == c.name]
            if not values or not c.holds(values):
                return False
        return True

    def exclusive(self, other: Conditions) -> bool:
        mine = {(c.kind, c.name): c for c in self.items}
        for c in other.items:
            m = mine.get((c.kind, c.name))
            if m is not None and m.regex is None and c.regex is None and m.exact != c.exact:
                return True
        return False
