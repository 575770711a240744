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
                self.dropped += sum(n for data, n in self._queue if data is not _REOPEN)
                self._queue.clear()
            log.warning("access log: the destination did not take the last lines in %.0fs; "
                        "%d line(s) dropped in all", timeout, self.dropped)

    def wait_idle(self, timeout: float) -> bool:
        """Block until everything submitted is written (tests, and a flush asked to
        wait); False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._pending, timeout)

    @property
    def pending(self) -> int:
        return self._pending

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
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            with self._cond:
                self.dropped += lines
            if not self.failed:
                self.failed = True
                log.error("access log: writing failed (%s); lines are dropped and counted until "
                          "it works again", exc)
        else:
            self.failed = False
