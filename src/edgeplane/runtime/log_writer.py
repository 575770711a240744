"""The access log's writer thread: batches of lines go out without ever blocking the loop.

Owns `LineWriter`, one thread per access log. The event loop hands it whole batches
(`submit`), which it queues and returns at once; the thread writes them with blocking
`os.write` calls (which release the GIL), so a slow disk, a full pipe or a terminal
that is not being read never stalls a request. The queue is bounded in bytes: a batch
that would pass `max_pending` is dropped whole and its lines are counted (`dropped`).

Invariants:
- Batches are written in the order submitted, each whole, to the descriptor current
  when it was submitted (`reopen` is queued like a batch, so logrotate never splits a
  batch between the old file and the new one).
- On a pipe, a socket or a terminal (stdout under Docker or systemd), each write holds
  whole lines and at most PIPE_BUF bytes, so lines from several workers sharing it never
  interleave. A write that fails half-way (a full disk) cuts at most one line, which the
  next successful write ends with a line break; the lines not written are counted.
- `close` lets the thread write what is queued and close the descriptor; it waits at
  most `timeout` seconds (a destination blocked forever cannot hold the gateway's
  stop), then gives up on the rest, counted.
- Destination `logging` hands each line to the Python logger `edgeplane.access` on this
  thread instead of writing a descriptor.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import stat
import threading
from typing import Any

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
                data, extra = self._queue.popleft()
            if data is _REOPEN:
                old, self._fd = self._fd, extra
                self._chunk, self._torn = _atomic_size(extra), False
                if self._owns_fd:
                    os.close(old)
                continue
            self._write(data, extra)
            with self._cond:
                self._pending -= len(data)
                self._cond.notify_all()  # wait_idle
        if self._owns_fd:
            os.close(self._fd)

    def _write(self, data: bytes, lines: int) -> None:
        if self._to_logging:
            for line in data.splitlines():
                access_logger.info(line.decode("utf-8", "replace"))
            return
        if self._torn:  # the last failure cut a line: end it, so the next one starts whole
            data = b"\n" + data
        self._inflight = lines
        view = memoryview(data)
        chunk = self._chunk
        try:
            while view:
                part = view
                if chunk and len(view) > chunk:  # a pipe: whole lines of at most PIPE_BUF a write
                    end = bytes(view[:chunk]).rfind(b"\n") + 1
                    part = view[:end or chunk]  # (a line longer than PIPE_BUF cannot stay whole)
                written = os.write(self._fd, part)
                if chunk:
                    self._inflight -= bytes(part[:written]).count(b"\n")
                view = view[written:]
        except OSError as exc:
            rest = bytes(view)
            done = len(data) - len(rest)
            self._torn = (self._torn and not done) or (done > 0 and data[done - 1:done] != b"\n")
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


def _atomic_size(fd: int) -> int:
    """For a pipe, a socket or a terminal, the largest write that stays whole when other
    processes (the other workers) write to it too: PIPE_BUF. 0 for a file (each
    append-mode write lands whole) or an unknown descriptor."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return 0
    return select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) else 0
