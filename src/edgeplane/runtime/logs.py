"""Process logging: one format for the CLI, the supervisor and every worker.

Owns the root logger's handler: stderr by default (systemd's journal, Docker's log
driver), or a file (`serve --log-file PATH`, inherited by the workers through
`ENV_LOG_FILE`). Every process opens the file in append mode, so lines of the
supervisor and its workers interleave whole. `reopen()` (SIGUSR1) closes and reopens
it for logrotate; on stderr it is a no-op.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_LOG_FILE = "EDGEPLANE_LOG_FILE"


def setup_logging(level: str, file: str | None = None) -> None:
    """Log at `level` ("debug", "info", ...), each line naming the process id, to stderr
    or appended to `file`."""
    handler: logging.Handler = logging.FileHandler(file, mode="a") if file else logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
        handlers=[handler],
        force=True,
    )


def reopen() -> int:
    """Reopen every file handler of the root logger (after a rename); how many."""
    count = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
            count += 1
    return count
