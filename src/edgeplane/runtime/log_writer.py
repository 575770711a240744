"""The access log's writer thread: batches of lines go out without ever blocking the loop.

Owns `LineWriter`, one thread per access log. The event loop hands it whole batches
(`submit`), which it queues and returns at once; the thread writes them with blocking
`os.write`/`os.writev` calls (which release the GIL), so a slow disk, a full pipe or a
terminal that is not being read never stalls a request. The queue is bounded in bytes: a batch
that would pass `max_pending` is dropped whole and its lines are counted (`dropped`).

Invariants:
- Batches are written in the order submitted, each whole, to the descriptor current
  when it was submitted (`reopen` is queued like a batch, so logrotate never splits a
  batch between the old file and the new one).
- On a pipe, a socket or a terminal (stdout under Docker or systemd), each write holds
  whole lines and at most PIPE_BUF bytes, so lines from several workers sharing it never
  interleave (with the compiled helper `_cwrite`, a whole batch of such writes runs
  with the GIL released once; without it, each write takes the GIL back). A write
  that fails half-way (a full disk) cuts at most one line, which the next successful
  write ends with a line break; the lines not written are counted.
- `close` lets the thread write what is queued and close the descriptor; it waits at
  most `timeout` seconds (a destination blocked forever cannot hold the gateway's
  stop), then gives up on the rest, counted.
- Destination `logging` hands each line to the Python logger `edgeplane.access` on this
  thread instead of writing a descriptor.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import stat
import threading
from collections.abc import Callable
from typing import Any

from edgeplane.http import native

# The compiled pipe writer (`_cwrite`), built with the native framers; None: the Python loop.
_write_lines: Callable[[int, memoryview, int], tuple[int, int]] | None = None
if native.COMPILED:
    with contextlib.suppress(ImportError):
        from edgeplane.runtime._cwrite import write_lines as _write_lines  # type: ignore[no-redef,import-not-found,unused-ignore]

access_logger = logging.getLogger("edgeplane.access")
log = logging.getLogger("edgeplane.server")

_REOPEN = object()


class LineWriter:
    def __init__(self, fd: int, *, max_pending: int, owns_fd: bool, to_logging: bool = False) -> None:
        self._fd = fd
        self._owns_fd = owns_fd
        self._to_logging = to_logging
        self.max_pending = max_pending
        self._queue: collections.deque[Any] = collections.deque()
        self._pending = 0  # bytes queued, not yet written
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0  # lines dropped: the queue was full, or left at close
        self.failed = False  # a write failed (the file's disk is gone...): logged once
        self._torn = False  # a failed write cut a line in two: the next write ends it first
        self._inflight = 0  # lines of the batch being written, not known to be written yet
        self._chunk = _atomic_size(fd)
        self._thread = threading.Thread(target=self._run, name="edgeplane-access-log", daemon=True)
        self._thread.start()

    def submit(self, data: bytes, lines: int) -> bool:
        """Queue `data` (`lines` whole lines); False when it was dropped (queue full)."""
        with self._cond:
            if self._pending + len(data) > self.max_pending or self._closing:
                self.dropped += lines
                return False
            self._pending += len(data)
            self._queue.append((data, lines))
            self._cond.notify()
        return True

    def reopen(self, fd: int) -> None:
        """Write to `fd` from now on (what is queued still goes to the old descriptor)."""
        with self._cond:
            self._queue.append((_REOPEN, fd))
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking lines; the thread writes what is queued, then closes an owned
        descriptor. Waits at most `timeout` seconds (0: not at all, for a log a reload
        replaced); past it, what is still queued is dropped and counted."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if timeout <= 0:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():  # the destination is blocked: what is left is lost
            with self._cond:
                self.dropped += sum(n for data, n in self._queue if data is not _REOPEN) + self._inflight
                self._queue.clear()
            log.warning("access log: the destination did not take the last lines in %.0fs; "
                        "%d line(s) dropped in all", timeout, self.dropped)

    def wait_idle(self, timeout: float) -> bool:
        """Block until everything submitted is written (tests, and a flush asked to
        wait); False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._pending, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                # Every batch queued, up to a reopen, at once. While the loop is busy, this
                # thread takes the GIL back after a write only at the switch interval (5 ms):
                # one batch per take could not keep up, the queue would fill and drop lines.
                batches: list[bytes] = []
                lines = 0
                while self._queue and self._queue[0][0] is not _REOPEN:
                    data, n = self._queue.popleft()
                    batches.append(data)
                    lines += n
                if not batches:
                    _, fd = self._queue.popleft()
            if not batches:
                old, self._fd = self._fd, fd
                self._chunk, self._torn = _atomic_size(fd), False
                if self._owns_fd:
                    os.close(old)
                continue
            self._write(batches, lines)
            with self._cond:
                self._pending -= sum(map(len, batches))
                self._cond.notify_all()  # wait_idle
        if self._owns_fd:
            os.close(self._fd)

    def _write(self, batches: list[bytes], lines: int) -> None:
        if self._to_logging:
            for data in batches:
                for line in data.splitlines():
                    access_logger.info(line.decode("utf-8", "replace"))
            return
        # what is left to write; the last failure cut a line: end it, so the next starts whole
        parts = [memoryview(data) for data in ([b"\n", *batches] if self._torn else batches)]
        self._inflight = lines
        chunk = self._chunk
        done, last, err = 0, b"\n", 0  # bytes written, the last of them, the helper's errno
        try:
            while parts:
                if not chunk:  # a file (each append-mode write lands whole): as few writes as can be
                    written = os.writev(self._fd, parts[:_IOV_MAX])
                elif _write_lines is not None:  # a pipe, with the compiled helper: a part per GIL release
                    view = parts[0]
                    written, err = _write_lines(self._fd, view, chunk)
                    self._inflight -= bytes(view[:written]).count(b"\n")
                else:  # a pipe: whole lines of at most PIPE_BUF a write
                    view = parts[0]
                    end = bytes(view[:chunk]).rfind(b"\n") + 1 if len(view) > chunk else len(view)
                    written = os.write(self._fd, view[:end or chunk])  # (a longer line cannot stay whole)
                    self._inflight -= bytes(view[:written]).count(b"\n")
                done += written
                while parts and written >= len(parts[0]):  # the parts written whole
                    written -= len(parts[0])
                    last = bytes(parts.pop(0)[-1:]) or last
                if written:  # the one written in part
                    last, parts[0] = bytes(parts[0][written - 1:written]), parts[0][written:]
                if err:
                    raise OSError(err, os.strerror(err))
        except OSError as exc:
            rest = b"".join(parts)
            self._torn = (self._torn and not done) or (done > 0 and last != b"\n")
            with self._cond:
                self.dropped += min(lines, rest.count(b"\n"))
            if not self.failed:
                self.failed = True
                log.error("access log: writing failed (%s); lines are dropped and counted until "
                          "it works again", exc)
        else:
            self.failed = False
            self._torn = False
        self._inflight = 0


# The most buffers one `os.writev` takes (IOV_MAX: 1024 on Linux, at least 16 by POSIX).
_IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))


def _atomic_size(fd: int) -> int:
    """For a pipe, a socket or a terminal, the largest write that stays whole when other
    processes (the other workers) write to it too: PIPE_BUF. 0 for a file (each
    append-mode write lands whole), another device (/dev/null) or an unknown descriptor:
    written in as few writes as can be (each write takes the GIL back, which waits for
    the switch interval while the loop is busy)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return 0
    return select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd) else 0
