"""Which native framers run: the compiled ones (`_cframing`, typed Cython) or their
pure-Python twins (`framing` for client requests, `response_framing` for upstream
responses), as aiohttp and yarl choose.

The compiled module is built by the package's own build when a C compiler is there
(`setup.py`); without one the install still succeeds and the twin runs. Setting
`EDGEPLANE_NO_EXTENSIONS=1` picks the twin even when the compiled module exists (the
test suite runs once each way). `describe()` is what the gateway's start line and
`edgeplane --version` say about it.
"""

from __future__ import annotations

import os
from typing import Any

from edgeplane.http import framing, response_framing

RequestFramer: Any = framing.RequestFramer
ResponseFramer: Any = response_framing.ResponseFramer
COMPILED = False
WHY = "pure Python"

if os.environ.get("EDGEPLANE_NO_EXTENSIONS", "") not in ("", "0"):
    WHY = "pure Python: EDGEPLANE_NO_EXTENSIONS is set"
else:
    try:
        from edgeplane.http import _cframing  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        WHY = "pure Python: the compiled framers are not built (no C compiler at install?)"
    else:
        RequestFramer = _cframing.RequestFramer
        ResponseFramer = _cframing.ResponseFramer
        COMPILED = True
        WHY = "compiled"


def describe(parser: str = "native") -> str:
    """What parses client requests, for the start line and `--version`: e.g.
    "parser native (compiled)", "parser h11"."""
    return f"parser native ({WHY})" if parser == "native" else f"parser {parser}"
