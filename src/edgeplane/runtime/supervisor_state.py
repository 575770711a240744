"""What the supervisor of `workers: N` shares with its workers outside the listeners.

Owns:
- The cross-worker throttle tables in /dev/shm (`edgeplane-<pid>`, `edgeplane-<pid>-keys`),
  made whenever the workers' limits are not in Redis (`cluster:`), with room for the
  limits reloads add or change (`slots.SlotMap`).
- The private directory (`edgeplane-<pid>-*` in the temp dir, 0700): the workers' spec
  (`worker.json`, written by the supervisor), the WebSocket APIs' per-worker Unix
  sockets, and the reload outcomes the workers report in /stats and the admin reload
  call (`refused.json`: the supervisor's refusals; `applied.json`: the last reload every
  worker answered).
- Stale state: `remove_stale_state()` finds the tables and directories of supervisors
  that are gone (SIGKILL) by the pid in their names and removes them at the next start.

Invariants: every file written here is replaced whole (`os.replace`), so a reader sees
the old or the new content; `remove()` runs on every exit path of the supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any

from edgeplane.config.model import Config
from edgeplane.observability.aggregate import write_json
from edgeplane.policies.throttle.shared_keys import SharedKeyTable
from edgeplane.policies.throttle.shared_limits import SHM_DIR, SharedLimitTable
from edgeplane.policies.throttle.slots import SlotMap
from edgeplane.runtime import systemd

log = logging.getLogger("edgeplane.workers")

ENV_SHARED = "EDGEPLANE_SHARED_LIMITS"  # name of the cross-worker throttle table
ENV_SHARED_KEYS = "EDGEPLANE_SHARED_KEYS"  # name of the per-client (keyed) table, if any

REFUSED = "refused.json"
APPLIED = "applied.json"


class SharedState:
    def __init__(self) -> None:
        self.shared_table: SharedLimitTable | None = None
        self.keyed_table: SharedKeyTable | None = None
        self.run_dir: str | None = None  # private (0700): worker.json, WebSocket sockets
        self.ws_dir: str | None = None  # WebSocket APIs: the workers' admin sockets
        self.ws_host_tag = ""
        self.refused = 0

    def create(self, cfg: Config, n: int, slots: SlotMap) -> None:
        if cfg.cluster is None:
            # Tables for the whole server, so every limit holds across workers; sized by
            # `slots` (the start's limits and room for reloads), which places each limit.
            self.shared_table = SharedLimitTable.create(f"edgeplane-{os.getpid()}", n, slots.capacity["plain"])
            self.keyed_table = SharedKeyTable.create(f"edgeplane-{os.getpid()}-keys", n, slots.capacity["keyed"])
        self.run_dir = tempfile.mkdtemp(prefix=f"edgeplane-{os.getpid()}-")
        # Each worker serves the admin app on a Unix socket in this private directory:
        # @connections calls reach the worker that holds a connection through it (the
        # host tag goes into every connection id), and a cache flush reaches every worker.
        self.ws_dir = self.run_dir
        self.ws_host_tag = os.urandom(4).hex()

    def remove(self) -> None:
        for table in (self.shared_table, self.keyed_table):
            if table is not None:
                table.close()
                table.unlink()
        self.shared_table = self.keyed_table = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = self.ws_dir = None

    def worker_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.shared_table is not None:
            env[ENV_SHARED] = self.shared_table.name
        if self.keyed_table is not None:
            env[ENV_SHARED_KEYS] = self.keyed_table.name
        if self.ws_dir is not None:
            env["EDGEPLANE_WS_SOCKET_DIR"] = self.ws_dir
            env["EDGEPLANE_WS_HOST_TAG"] = self.ws_host_tag
        return env

    def _write(self, name: str, content: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        try:
            write_json(os.path.join(self.run_dir, name), content)
        except OSError as exc:
            log.warning("could not record the reload outcome for the workers (%s): %s", name, exc)

    def record_refusal(self, source: str, errors: list[str]) -> None:
        """Workers show the supervisor's refusals in their /stats (`reloads.
        refused_by_supervisor`): the supervisor has no admin listener of its own."""
        self.refused += 1
        self._write(REFUSED, {"count": self.refused,
                              "last": {"source": source, "errors": errors, "at": time.time()}})

    def record_applied(self, generation: int, config_hash: str, applied: int, restarting: int,
                       ms: float) -> None:
        """The reload of `generation` is answered by every worker (`applied` of them
        applied it live, `restarting` restart on it): what the admin call waits for."""
        self._write(APPLIED, {"generation": generation, "hash": config_hash, "applied": applied,
                              "restarting": restarting, "ms": round(ms, 1)})


def read_outcome(run_dir: str, name: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, name), encoding="utf-8") as fh:
            found: dict[str, Any] = json.load(fh)
    except (OSError, ValueError):
        return None
    return found


_STALE_SHM = re.compile(r"edgeplane-(\d+)(?:-keys)?")
_STALE_DIR = re.compile(r"edgeplane-(\d+)-[A-Za-z0-9_]+")


def remove_stale_state(shm_dir: str = SHM_DIR, tmp_dir: str | None = None) -> list[str]:
    """Remove the shared-memory tables and private directories of supervisors that are
    gone (their pid is in the name); returns the paths removed. Only this user's."""
    removed: list[str] = []
    for directory, pattern in ((shm_dir, _STALE_SHM), (tmp_dir or tempfile.gettempdir(), _STALE_DIR)):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            m = pattern.fullmatch(name)
            path = os.path.join(directory, name)
            if m is None or _supervisor_alive(int(m.group(1))):
                continue
            try:
                st = os.lstat(path)
                if st.st_uid != os.geteuid():
                    continue
                if pattern is _STALE_DIR:
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                continue
            removed.append(path)
    for path in removed:
        log.warning("removed %s, left by a supervisor that is gone", path)
    return removed


def _supervisor_alive(pid: int) -> bool:
    """Whether `pid` may still be the supervisor that named a table: alive and, where
    /proc tells, an edgeplane process (not a pid reused by another program)."""
    if pid == os.getpid() or not systemd.alive(pid):
        return False  # ours is not created yet: one with our pid is a dead namesake's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"edgeplane" in f.read()
    except OSError:
        return True
