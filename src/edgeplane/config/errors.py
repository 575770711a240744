"""The error type for refused input files: every problem listed as "location: message".

Owns `LocatedErrors`, the base of `config.ConfigError` and `apikeys.ApiKeyFileError`, so
the CLI and tests treat every refused file the same way, and `describe()`/`short()`, the
wording of a bad value inside those messages.
"""

from __future__ import annotations

from typing import Any, Iterable


class LocatedErrors(Exception):
    """`errors` lists every problem as "location: message"; `source` names the input."""

    what = "input"  # how `__str__` names the refused thing

    def __init__(self, errors: Iterable[str], source: str = "<input>") -> None:
        self.errors: list[str] = list(errors)
        self.source = source
        super().__init__(self.errors)

    def __str__(self) -> str:
        n = len(self.errors)
        head = f"invalid {self.what} {self.source}: {n} error{'s' if n != 1 else ''}"
        return head + "".join(f"\n  - {e}" for e in self.errors)


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
