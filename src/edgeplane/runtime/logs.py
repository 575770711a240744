"""Process logging: one format for the CLI, the supervisor and every worker."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str) -> None:
    """Log to stderr at `level` ("debug", "info", ...), each line naming the process id."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
        stream=sys.stderr,
        force=True,
    )
