"""The supervisor's side of a reload with `workers: N` (a mixin of `workers.Supervisor`).

Owns what happens between a SIGHUP to the supervisor and every worker serving the new
config, or none of them:

- `_reload`: load and validate the file once (`load_config` with the CLI's overrides,
  `reload.refusals`), place the shared limits (`slots.SlotMap.advance`), claim the
  listeners the config adds; refused: every error logged by location, recorded for the
  workers' /stats and the admin call (`supervisor_state`), nothing changes. Accepted: a
  new generation of the workers' spec, each worker gets its slots of the added listeners
  on its control channel, then SIGHUP.
- `_read_statuses`: the workers' answers, `K <generation>` (applied) or `F <generation>
  <errors as JSON>` (refused or failed; the worker keeps its old config).
- `_check_reload`: once every worker answered (or `RELOAD_TIMEOUT` passed): when at
  least one applied it, the workers that failed are restarted on the new config, one at
  a time (`_advance_restarts`), the listeners the new config dropped are released and
  the outcome recorded (`applied.json`). When no worker could apply it, the reload is
  refused as one process refuses it: rolled back (`_roll_back`: the old config, slot map
  and listeners) and refused with the workers' errors. Restarting workers on a config
  none of them could apply would risk every worker, so no worker is stopped for it.

Invariants: one reload at a time (a SIGHUP during one runs one more after it); the
supervisor's config is the one every serving worker runs or is being restarted on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from edgeplane.config.loader import ConfigError
from edgeplane.deploy.served import load_served
from edgeplane.policies.throttle.slots import SlotMap, SlotsExhausted
from edgeplane.runtime import listeners, systemd
from edgeplane.runtime.reload import ReloadRefused, refusals, reload_source
from edgeplane.runtime.serving import addresses, log_refused, port_key
from edgeplane.runtime.supervisor_state import SharedState

if TYPE_CHECKING:
    import socket

    from edgeplane.config.model import Config
    from edgeplane.runtime.listeners import Claim

log = logging.getLogger("edgeplane.workers")

RELOAD_TIMEOUT = 60.0  # a worker that has not answered a reload by then is restarted


class SupervisorReloads:
    config: Config
    n: int
    overrides: dict[str, Any]
    claims: dict[str, Claim]
    procs: list[subprocess.Popen[bytes] | None]
    channels: list[socket.socket | None]
    status: list[int | None]
    partial: list[bytes]
    state: SharedState
    slots: SlotMap
    generation: int
    form_hash: str
    restart_queue: list[int]
    restarting: int | None

    def _init_reloads(self) -> None:
        self.pending: dict[int, int] = {}  # worker -> generation it has not answered yet
        self.applied: set[int] = set()  # workers that applied the reload in progress
        self.failed: dict[int, list[str]] = {}  # workers that could not, with their errors
        self.reload_started: float | None = None
        self.reload_wanted = False  # a SIGHUP during a reload: one more after it
        self.release_after: list[str] = []  # claims the new config dropped
        # what the reload in progress replaced: (config, slot map, claims it added)
        self.rollback: tuple[Config, SlotMap, list[str]] | None = None
        self.asked_by: int | None = None  # the worker whose admin call waits for the outcome

    # Provided by `workers.Supervisor`.
    def _claim_new(self, config: Config) -> list[str]:
        raise NotImplementedError

    def _release(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _write_spec(self) -> None:
        raise NotImplementedError

    def _close_status(self, i: int) -> None:
        raise NotImplementedError

    def _live(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        raise NotImplementedError

    def _pause_slot(self, i: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ start
    def _reload(self) -> None:
        if self.reload_started is not None:
            self.reload_wanted = True  # after the one in progress
            return
        systemd.reloading()
        started = time.monotonic()
        source = self.config.source
        running = self.form_hash
        try:
            new = load_served(reload_source(source), overrides=self.overrides)
            problems = refusals(self.config, new, shared_tables=True, slot_map=True)
            if problems:
                raise ReloadRefused(problems)
            # Unchanged limits keep their slots; new and changed ones get free ones.
            slots, reused = (self.slots.advance(new, time.monotonic()) if self.state.shared_table is not None
                             else (self.slots, []))
            added = self._claim_new(new)
        except (ConfigError, ReloadRefused, SlotsExhausted, LookupError, OSError) as exc:
            errors = (exc.located() if isinstance(exc, ConfigError) else exc.problems
                      if isinstance(exc, ReloadRefused) else [str(exc)])
            self._refused(source, running, list(errors))
            return
        wanted = {port_key(kind, a) for kind, a in addresses(new)}
        self.release_after = [key for key in self.claims if key not in wanted]
        for kind, index in reused:  # before any worker can see the map that reuses them
            table = self.state.shared_table if kind == "plain" else self.state.keyed_table
            table.reset(index)  # type: ignore[union-attr]
        self.rollback = (self.config, self.slots, added)
        self.config, self.slots = new, slots
        self.generation += 1
        self._write_spec()
        self.reload_started = started
        self.applied, self.failed = set(), {}
        new_claims = [self.claims[key] for key in added]
        for i, proc in self._live():
            try:
                # the sockets of added addresses first: the worker takes them on the SIGHUP
                listeners.send_added(self.channels[i], new_claims, i, self.n)  # type: ignore[arg-type]
            except OSError as exc:
                self._restart_on_new_config(i, f"could not get the new listeners ({exc})")
                continue
            try:
                proc.send_signal(signal.SIGHUP)
            except ProcessLookupError:
                continue
            self.pending[i] = self.generation
        log.info("reload: config %s accepted (was %s); applying it in %d workers",
                 self.form_hash, running, len(self.pending))
        self._check_reload()

    def _refused(self, source: str, running: str, errors: list[str]) -> None:
        log_refused(source, running, errors)
        self.state.record_refusal(source, errors)
        systemd.ready()

    # ------------------------------------------------------------------ answers
    def _read_statuses(self) -> None:
        for i, fd in enumerate(self.status):
            if fd is None:
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:  # the worker is exiting (`_reap` sees it): its slot takes nothing more
                self._close_status(i)
                self._pause_slot(i)
                continue
            *lines, self.partial[i] = (self.partial[i] + data).split(b"\n")
            for line in lines:
                if line == b"A":  # its admin call asked for a reload and waits for the outcome
                    self.asked_by = i
                    continue
                kind, _, rest = line.decode("utf-8", "replace").partition(" ")
                generation, _, detail = rest.partition(" ")
                if not generation.isdigit() or self.pending.get(i) != int(generation):
                    continue  # not the reload being waited for (a stray SIGHUP's answer)
                del self.pending[i]
                if kind == "K":
                    self.applied.add(i)
                elif kind == "F":
                    self.failed[i] = _errors(detail)

    def _restart_on_new_config(self, i: int, why: str) -> None:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None or i in self.restart_queue or i == self.restarting:
            return
        log.warning("worker %d (pid %d) %s; restarting it on config %s", i, proc.pid, why,
                    self.form_hash)
        self.restart_queue.append(i)

    def _advance_restarts(self) -> None:
        """Stop the next worker of the restart queue once the previous one is back."""
        while self.restarting is None and self.restart_queue:
            i = self.restart_queue.pop(0)
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:  # else its exit restarts it anyway
                self.restarting = i
                self._pause_slot(i)  # new connections go to the others until its successor listens
                proc.send_signal(signal.SIGTERM)  # it drains on the old config; its successor starts on the new

    # ------------------------------------------------------------------ outcome
    def _check_reload(self) -> None:
        if self.reload_started is None:
            return
        if self.pending and time.monotonic() - self.reload_started > RELOAD_TIMEOUT:
            for i in list(self.pending):
                self._restart_on_new_config(i, f"did not answer the reload in {RELOAD_TIMEOUT:.0f}s")
            self.pending.clear()
        if self.pending:
            return
        asked_by, self.asked_by = self.asked_by, None
        if self.failed and not self.applied:
            self._roll_back()
            return
        # The worker whose admin call waits for the outcome restarts last.
        for i, errors in sorted(self.failed.items(), key=lambda item: item[0] == asked_by):
            self._restart_on_new_config(i, "failed to apply it (" + "; ".join(errors)[:300] + ")")
        self._reloaded()

    def _reloaded(self) -> None:
        assert self.reload_started is not None  # a reload is in progress
        restarts = len(self.restart_queue) + (self.restarting is not None)
        ms = (time.monotonic() - self.reload_started) * 1000
        applied = len(self.applied)
        log.info("reloaded config %s in %d workers in %.1f ms%s", self.form_hash, applied, ms,
                 f"; {restarts} restarting on it, one at a time" if restarts else "")
        self.state.record_applied(self.generation, self.form_hash, applied, restarts, ms)
        self._release(self.release_after)  # no worker listens on them any more
        systemd.ready(f"{self.n} workers")
        self._finish_reload()

    def _finish_reload(self) -> None:
        self.reload_started = None
        self.release_after, self.rollback = [], None
        if self.reload_wanted:
            self.reload_wanted = False
            self._reload()

    def _roll_back(self) -> None:
        """No worker could apply the reload: they all still run the old config. Go back
        to it, and refuse."""
        assert self.rollback is not None  # set by `_reload` with the reload it describes
        config, slots, added = self.rollback
        refused_hash = self.form_hash
        self.config, self.slots = config, slots
        self._release(added)  # the listeners it added; the ones it dropped stay
        self.generation += 1
        self._write_spec()  # a worker restarted from now on starts on the old config again
        errors = next(iter(self.failed.values()))
        self._refused(config.source, self.form_hash,
                      [f"no worker could apply config {refused_hash}; the supervisor went back to the "
                       "running one", *errors])
        self._finish_reload()


def _errors(detail: str) -> list[str]:
    try:
        found = json.loads(detail) if detail else []
    except ValueError:
        found = [detail]
    return [str(e) for e in found] if isinstance(found, list) else [str(found)]
