"""The access log: one line per request, in the default JSON shape or an `access_log.format`.

Owns the in-memory buffer of log lines and its hand-off to the writer thread
(`log_writer.LineWriter`). `record()` runs on the hot path: it renders one line (the
compiled format of `observability.access_format`, or the default shape compiled the
same way) and appends the bytes to a list. `flush()` runs from the worker's once-a-tick
timer (or when the buffer passes `buffer_bytes`) and hands the batch to the writer
thread, which writes it to stdout, stderr, a file or Python logging. Nothing here
awaits or blocks: a destination that does not keep up makes the writer drop whole
batches past `queue_bytes`, counted (`dropped`).

`reopen()` (SIGUSR1, for logrotate) hands what is buffered over for the file it was
meant for, then has the writer switch to `path` opened anew, so after a rename the next
line lands in a new file. Lines are never split between the two files.

Default fields: requestId, sourceIp, requestTime (CLF, as AWS), requestTimeEpoch (ms),
httpMethod, routeKey, path, protocol, status, responseLength, responseLatency (ms), integrationLatency
(ms or null), integrationError, upstream, error (the gateway's reason for a local error),
clientCertSubject (mTLS: the client certificate's RFC 4514 subject, or null), clientIp
(the client behind trusted proxies, else null), authorizerPrincipal (the JWT `sub`, i.e.
$context.authorizer.claims.sub, the API key id, or a custom authorizer's `principalId`); traceId (with tracing on); and
`websocket` on WebSocket lines.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from edgeplane.http.request import Request
from edgeplane.observability.access_format import default_render, principal, websocket_record
from edgeplane.runtime.log_writer import LineWriter

if TYPE_CHECKING:
    from edgeplane.config.model import AccessLogConfig
    from edgeplane.observability.access_format import Render

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clf_time(epoch: float) -> str:
    t = time.gmtime(epoch)
    return f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


class AccessLog:
    __slots__ = ("enabled", "_writer", "_path", "_buf", "_size", "_limit", "_flushed_lines", "clf_from", "clf_until",
                 "clf_bytes", "_render", "callback", "_records", "failed", "_failed_logged_at", "_base_dropped",
                 "_stage_renders", "_stage_logs")

    def __init__(self, cfg: AccessLogConfig,
                 callback: Callable[[list[dict[str, Any]]], None] | None = None,
                 previous: AccessLog | None = None) -> None:
        """`previous`: the log a reload replaces, whose counts this one goes on from."""
        self.enabled = cfg.destination != "off" or callback is not None
        self._path: str | None = None  # destination 'file': what `reopen()` opens again
        self._writer: LineWriter | None = None
        fd, owns = -1, False
        if cfg.destination in ("stdout", "stderr"):
            fd = (sys.stdout if cfg.destination == "stdout" else sys.stderr).fileno()
        elif cfg.destination == "file":
            # the loader requires `path` with destination 'file'
            self._path = cast(str, cfg.path)
            fd, owns = _open(self._path), True
        if cfg.destination != "off":
            self._writer = LineWriter(fd, max_pending=cfg.queue_bytes, owns_fd=owns,
                                      to_logging=cfg.destination == "logging")
        # A custom `format` compiled at load (config.sections), else the default JSON shape.
        self._render: Render = cfg.render if cfg.render is not None else _DEFAULT
        self._stage_renders: dict[str, Render] = dict(cfg.stage_renders)  # a stage's own format
        # a stage's own destination: its own log (writer, buffer, counts), same callback
        before = dict(previous._stage_logs) if previous is not None else {}
        self._stage_logs: dict[str, AccessLog] = {
            stage: AccessLog(own, callback, previous=before.get(stage)) for stage, own in cfg.stage_logs}
        if self._stage_logs:
            self.enabled = True
        # An embedder's callback gets each record (the default shape's dict), batched per flush.
        self.callback = callback
        self._records: list[dict[str, Any]] = []
        self.failed = 0  # lines that could not be rendered (a bug; counted in `dropped`)
        self._failed_logged_at = -1e9
        self._buf: list[bytes] = []
        self._size = 0
        self._limit = cfg.buffer_bytes
        self._flushed_lines: int = previous.lines if previous is not None else 0
        self._base_dropped = previous.dropped if previous is not None else 0
        # `clf_bytes` is the CLF time of the wall-clock times in [clf_from, clf_until): one
        # second, compared as floats by the formats (cheaper than int() on every line)
        self.clf_from, self.clf_until = math.inf, -math.inf
        self.clf_bytes = b""

    @property
    def dropped(self) -> int:
        """Lines dropped: the writer's queue was full (a slow destination), a write
        failed, or (a bug) a line could not be rendered (the stages' own logs included)."""
        own = sum(log.dropped for log in self._stage_logs.values()) if self._stage_logs else 0
        return self._base_dropped + (self._writer.dropped if self._writer is not None else 0) + self.failed + own

    @property
    def lines(self) -> int:
        """Lines rendered for the writer (dropped ones included), this log's own."""
        return self._flushed_lines + len(self._buf)

    @property
    def written(self) -> int:
        """Lines logged, the stages' own logs included."""
        return self.lines + sum(log.written for log in self._stage_logs.values())

    def clf_at(self, wall: float) -> bytes:
        """`wall` as CLF time (formatted once a second)."""
        second = int(wall)
        if not self.clf_from <= wall < self.clf_until:
            self.clf_bytes = clf_time(second).encode()
            # before 1970, int() rounds toward zero, not down: not cached
            self.clf_from, self.clf_until = (float(second), second + 1.0) if wall >= 0 else (math.inf, -math.inf)
        return self.clf_bytes

    def record(self, req: Any, proto: Any) -> None:
        """Log one ended request (the hot path: render, append)."""
        if self._stage_logs:
            own = self._stage_logs.get(req.stage)
            if own is not None:  # the stage's own destination
                own.record(req, proto)
                return
        if self.callback is not None:
            self._records.append(self.fields(req, proto))
        if self._writer is None:
            return
        render = self._stage_renders.get(req.stage, self._render) if self._stage_renders else self._render
        try:
            line = render(req, proto, self, perf_counter())
        except Exception:  # a bug: this line is lost (counted, logged), never the request
            self._failed(req)
            return
        self._buf.append(line)  # counted in `lines` by the buffer's length until flushed
        self._size += len(line)
        if self._size > self._limit:
            self.flush()

    def _failed(self, req: Any) -> None:
        self.failed += 1
        now = time.monotonic()
        if now - self._failed_logged_at >= 60:
            self._failed_logged_at = now
            logging.getLogger("edgeplane.server").exception(
                "access log: the line of request %r could not be rendered (%d line(s) lost in all; "
                "logged at most once a minute)", req.request_id, self.failed)

    def record_message(self, conn: Any, proto: Any, route_key: str, conn_id: str, message_id: str, t0: float,
                       status: int, received: int, sent: int) -> None:
        """Log one message of a WebSocket API connection (`conn`, its handshake request):
        eventType MESSAGE, the message id as request id, the integration's status."""
        req = Request(t0)
        req.method, req.path, req.host, req.trace_id = conn.method, conn.path, conn.host, conn.trace_id
        req.stage, req.canary, req.base_path = conn.stage, conn.canary, conn.base_path  # the $connect's
        req.request_id = message_id.encode()
        req.route_key = route_key
        req.integration_latency = time.perf_counter() - t0
        req.integration_status = status
        req.status = status or 502
        if not status:
            req.integration_error = "integration failed"
        req.body_size, req.response_length = received, sent
        req.ws_event = ("MESSAGE", conn_id, message_id)
        self.record(req, proto)

    def fields(self, req: Any, proto: Any) -> dict[str, Any]:
        """The access-log record of `req` in the default shape (also what log hooks and
        the embedder's callback receive)."""
        now = time.perf_counter()
        wall = req.t_wall
        integ = req.integration_latency
        fields = {
            "requestId": req.request_id.decode("latin-1"),
            "sourceIp": proto.peer_ip,
            "requestTime": self.clf_at(wall).decode(),
            "requestTimeEpoch": int(wall * 1000),
            "httpMethod": req.method.decode("latin-1"),
            "routeKey": req.route_key,
            "path": (req.base_path or req.path).decode("latin-1"),
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
            "authorizerPrincipal": principal(req),
        }
        if req.trace_id is not None:
            fields["traceId"] = req.trace_id
        ws = websocket_record(req)  # a WebSocket's line at close, or a WebSocket API's MESSAGE
        if ws is not None:
            fields["websocket"] = ws
        if req.context:  # what plugins put in RequestView.context
            fields["context"] = req.context
        return fields

    def flush(self, wait: float = 0.0) -> None:
        """Hand what is buffered to the writer thread, and the records to the embedder's
        callback. Never blocks, unless asked to `wait` (seconds, at most) until the
        writer has written it all (tests; never on the event loop of a serving gateway)."""
        if self._records:
            records, self._records = self._records, []
            try:
                cast(Callable[[list[dict[str, Any]]], None], self.callback)(records)
            except Exception:  # an embedder's bug: logged, the gateway goes on
                logging.getLogger("edgeplane.server").exception("access log callback failed")
        writer = self._writer
        if self._buf:
            data = b"".join(self._buf)
            lines = len(self._buf)
            self._buf.clear()
            self._size = 0
            self._flushed_lines += lines
            if writer is not None:
                writer.submit(data, lines)
        if wait > 0 and writer is not None:
            writer.wait_idle(wait)
        for log in self._stage_logs.values():
            log.flush(wait)

    def reopen(self) -> int:
        """Open the log files again (after logrotate renamed them): this one's and the
        stages' own; how many. One that cannot be opened keeps its old file."""
        count = sum(log.reopen() for log in self._stage_logs.values())
        if self._path is None or self._writer is None:
            return count
        self.flush()  # what was buffered belongs to the file being rotated out
        try:
            fd = _open(self._path)
        except OSError:
            return count
        self._writer.reopen(fd)
        return count + 1

    def close(self, timeout: float = 2.0) -> None:
        """Flush and stop the writer: it writes what is queued, waited for at most
        `timeout` seconds (0: a log a reload replaced, not waited for)."""
        self.flush()
        if self._writer is not None:
            self._writer.close(timeout)
            self._writer = None
        for log in self._stage_logs.values():
            log.close(timeout)
        self.enabled = self.callback is not None


_DEFAULT = default_render()


def _open(path: str) -> int:
    """`path` opened for appending, without ever blocking the loop: a FIFO with no reader
    is an error (ENXIO) at once instead of a wait for one; the descriptor is then made
    blocking for the writer thread."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        why = "a FIFO nobody reads" if exc.errno == errno.ENXIO else exc.strerror
        raise OSError(exc.errno, f"access_log.path {path!r} cannot be opened for appending: {why}") from None
    os.set_blocking(fd, True)
    return fd
