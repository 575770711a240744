"""The access log: one JSON line per request, fields named after AWS `$context` variables.

Owns the in-memory buffer of log lines and its flushing. `record()` runs on the hot path:
it serialises one dict with orjson and appends the bytes to a list. `flush()` runs from
the worker's once-a-tick timer (or when the buffer passes `buffer_bytes`) and writes
everything to stdout, stderr or a file in one call. Nothing here awaits.

`reopen()` (SIGUSR1, for logrotate) flushes what is buffered into the file it was meant
for, then opens `path` anew, so after a rename the next line lands in a new file. Lines
are never split between the two files: a batch is written whole to one descriptor.

Fields: requestId, sourceIp, requestTime (CLF, as AWS), requestTimeEpoch (ms), httpMethod,
routeKey, path, protocol, status, responseLength, responseLatency (ms), integrationLatency
(ms or null), integrationError, upstream, error (the gateway's reason for a local error),
clientCertSubject (mTLS: the client certificate's RFC 4514 subject, or null), clientIp
(the client behind trusted proxies, else null), authorizerPrincipal (the JWT `sub`, i.e.
$context.authorizer.claims.sub, or the API key id).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, cast

import orjson

if TYPE_CHECKING:
    from edgeplane.config.model import AccessLogConfig

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clf_time(epoch: float) -> str:
    t = time.gmtime(epoch)
    return f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


class AccessLog:
    __slots__ = ("enabled", "_fd", "_owns_fd", "_path", "_buf", "_size", "_limit", "lines", "_second", "_clf")

    def __init__(self, cfg: AccessLogConfig) -> None:
        self.enabled = cfg.destination != "off"
        self._owns_fd = False
        self._fd = -1
        self._path: str | None = None  # destination 'file': what `reopen()` opens again
        if cfg.destination == "stdout":
            self._fd = sys.stdout.fileno()
        elif cfg.destination == "stderr":
            self._fd = sys.stderr.fileno()
        elif cfg.destination == "file":
            # the loader requires `path` with destination 'file'
            self._path = cast(str, cfg.path)
            self._fd = _open(self._path)
            self._owns_fd = True
        self._buf: list[bytes] = []
        self._size = 0
        self._limit = cfg.buffer_bytes
        self.lines = 0
        self._second = -1
        self._clf = ""

    def record(self, req: Any, proto: Any) -> None:
        if self.enabled:
            self.write(self.fields(req, proto))

    def write(self, fields: dict[str, Any]) -> None:
        """Buffer one record as a JSON line (flushed on the tick or past the buffer size)."""
        line = orjson.dumps(fields, default=repr, option=orjson.OPT_APPEND_NEWLINE)
        self._buf.append(line)
        self._size += len(line)
        self.lines += 1
        if self._size > self._limit:
            self.flush()

    def fields(self, req: Any, proto: Any) -> dict[str, Any]:
        """The access-log record of `req` (also what log hooks receive)."""
        now = time.perf_counter()
        wall = req.t_wall
        second = int(wall)
        if second != self._second:  # the CLF timestamp is formatted once a second
            self._second = second
            self._clf = clf_time(second)
        integ = req.integration_latency
        fields = {
            "requestId": req.request_id.decode("latin-1"),
            "sourceIp": proto.peer_ip,
            "requestTime": self._clf,
            "requestTimeEpoch": int(wall * 1000),
            "httpMethod": req.method.decode("latin-1"),
            "routeKey": req.route_key,
            "path": req.path.decode("latin-1"),
            "protocol": "HTTP/" + req.version,
            "status": req.status,
            "responseLength": req.response_length,
            "responseLatency": round((now - req.t_start) * 1000, 3),
            "integrationLatency": None if integ is None else round(integ * 1000, 3),
            "integrationError": req.integration_error,
            "upstream": req.upstream,
            "error": req.error,
            "clientCertSubject": proto.client_cert_subject,
            "clientIp": req.client_ip,
            "authorizerPrincipal": _principal(req),
        }
        if req.ws_log is not None:  # one line per WebSocket connection, when it closes
            fields["websocket"] = req.ws_log
        if req.context:  # what plugins put in RequestView.context
            fields["context"] = req.context
        return fields

    def flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BlockingIOError:
            pass  # a full pipe: drop the rest of this batch rather than stall the loop
        except OSError:
            self.enabled = False

    def reopen(self) -> bool:
        """Open the log file again (after logrotate renamed it); False when the
        destination is not a file or the file cannot be opened (the old one stays)."""
        if self._path is None or not self._owns_fd:
            return False
        self.flush()  # what was buffered belongs to the file being rotated out
        try:
            fd = _open(self._path)
        except OSError:
            return False
        old, self._fd = self._fd, fd
        os.close(old)
        self.enabled = True  # a write error had switched it off: the new file gets a chance
        return True

    def close(self) -> None:
        self.flush()
        if self._owns_fd:
            os.close(self._fd)
            self._owns_fd = False


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _principal(req: Any) -> str | None:
    """Who the authorizer let in: the JWT's `sub` ($context.authorizer.claims.sub) or the
    API key's id."""
    if req.claims is not None:
        sub = req.claims.get("sub")
        return sub if isinstance(sub, str) else None
    if req.api_key is not None:
        return req.api_key.id
    return None
