"""Process logging: one format for the CLI, the supervisor and every worker.

Owns the root logger's handler: stderr by default (systemd's journal, Docker's log
driver), or a file (`serve --log-file PATH`, inherited by the workers through
`ENV_LOG_FILE`). Every process opens the file in append mode, so lines of the
supervisor and its workers interleave whole. `reopen()` (SIGUSR1) closes and reopens
it for logrotate; on stderr it is a no-op.

Two formats (`log.format`): `text` lines, or `json`, one object per line for log
shippers: `time` (RFC 3339, UTC, ms), `level`, `logger`, `pid`, `message`, `requestId`
on lines about one request (a log call passes `extra=http.request.log_extra(req)`), and
`exception` (the traceback) when there is one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

ENV_LOG_FILE = "EDGEPLANE_LOG_FILE"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["requestId"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=repr).decode()


def announce(text: str, fmt: str) -> None:
    """A line for people and scripts on stderr (`edgeplane ready: ...`): as it is, or with
    `log.format: json` as a JSON log record whose message it is."""
    if fmt == "json":
        record = logging.LogRecord("edgeplane", logging.INFO, __file__, 0, text, None, None)
        text = JsonFormatter().format(record)
    print(text, file=sys.stderr, flush=True)


def setup_logging(level: str, file: str | None = None, fmt: str = "text") -> None:
    """Log at `level` ("debug", "info", ...), each line naming the process id, to stderr
    or appended to `file`, as text or JSON (`fmt`)."""
    handler: logging.Handler = logging.FileHandler(file, mode="a") if file else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


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
