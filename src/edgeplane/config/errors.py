"""The error type for refused input files: every problem listed as "location: message".

Owns `LocatedErrors`, the base of `config.ConfigError` and `apikeys.ApiKeyFileError`, so
the CLI and tests treat every refused file the same way, and `describe()`/`short()`, the
wording of a bad value inside those messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    """One refused (or, as a warning, risky) value.

    `location` is the stable path text ("routes[2].integration.upstream") that
    `LocatedErrors.errors` and tests match; `display` is the same place as people read
    it, a route also named by its key ("routes[2] (GET /users/{id}).integration.upstream"),
    and equals `location` where there is nothing to add. `line` and `column` (1-based)
    point into the file where the value is spelled, None for a dict, a value set by an
    override, or a place the file does not spell out. `path` is the location as data
    (`("routes", 2, "integration", "upstream")`), empty when unknown."""

    location: str
    message: str
    line: int | None = None
    column: int | None = None
    path: tuple[Any, ...] = ()
    display: str = ""

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"

    @property
    def where(self) -> str:
        """The location as printed: `display` when set, else `location`."""
        return self.display or self.location

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape `edgeplane validate --format json` prints."""
        return {"location": self.where, "path": list(self.path), "line": self.line,
                "column": self.column, "message": self.message}


class LocatedStr(str):
    """A "location: message" string (what `Config.warnings` holds, so comparing with
    plain strings keeps working) that also carries its `Problem`: line, column, display."""

    problem: Problem

    def __new__(cls, problem: Problem) -> LocatedStr:
        self = super().__new__(cls, str(problem))
        self.problem = problem
        return self


class LocatedErrors(Exception):
    """`errors` lists every problem as "location: message"; `entries` holds the same
    problems as `Problem`s (with lines where known); `source` names the input."""

    what = "input"  # how `__str__` names the refused thing

    def __init__(self, errors: Iterable[str], source: str = "<input>",
                 entries: Sequence[Problem] | None = None) -> None:
        self.errors: list[str] = list(errors)
        self.source = source
        if entries is None:
            entries = [Problem(*_split(e)) for e in self.errors]
        self.entries: list[Problem] = list(entries)
        super().__init__(self.errors)

    def __str__(self) -> str:
        n = len(self.errors)
        head = f"invalid {self.what} {self.source}: {n} error{'s' if n != 1 else ''}"
        return head + "".join(f"\n  - {e}" for e in self.errors)

    def located(self) -> list[str]:
        """Every problem as `FILE:LINE:COLUMN: where: message` (see `located`)."""
        return [located(self.source, p) for p in self.entries]


def located(source: str, problem: Problem, kind: str = "") -> str:
    """One problem as editors and CI annotate it: ``FILE:LINE:COLUMN: [kind: ]where: message``
    (no line for a dict or an override; no location for a syntax or file error)."""
    pos = source
    if problem.line is not None:
        pos += f":{problem.line}" + (f":{problem.column}" if problem.column is not None else "")
    where = "" if problem.location in ("(yaml)", "(file)") else f"{problem.where}: "
    return f"{pos}: {kind + ': ' if kind else ''}{where}{problem.message}"


def _split(error: str) -> tuple[str, str]:
    location, sep, message = error.partition(": ")
    return (location, message) if sep else ("(root)", error)


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A bad value as a message names it: "integer 5", "string 'x'", "a mapping"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {short(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {short(value)}"
