"""The error type for refused input files: every problem listed as "location: message".

Owns `LocatedErrors`, the base of `config.ConfigError` and `apikeys.ApiKeyFileError`, so
the CLI and tests treat every refused file the same way.
"""

from __future__ import annotations

from typing import Iterable


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
