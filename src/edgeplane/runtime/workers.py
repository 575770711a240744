"""The supervisor of `workers: N`: N worker processes (`runtime.serving`) on shared ports.

Owns the worker processes and what they share:
- Ports: the supervisor claims every address (data, TLS, admin) with
  `listeners.claim`: its lock file, then one listening socket per worker (SO_REUSEPORT,
  the first bound exclusively so a port held by anyone else fails here, named; port 0
  is resolved once for all workers). It keeps them all open; worker i serves slot i,
  so the kernel spreads connections across the workers, and a worker that restarts
  gets its slot back with the connections queued on it.
- Life: it restarts a worker that dies (with backoff; it gives up, exiting 1, after
  `_START_FAILURES` starts in a row that never got ready), and on SIGTERM/SIGINT
  forwards SIGTERM to every worker, waits for them to drain, and exits 0. A worker that
  exits 0 or on SIGTERM was stopped on purpose (the process group got the signal): a
  warning, not an error; a stop signal seen first means no restart and no line at all.
- Reload (SIGHUP, `runtime.supervisor_reload`): validated once, applied by every worker
  from the spec file this supervisor writes; a worker that fails is restarted on the new
  config, and when none can apply it the reload is rolled back and refused.
- SIGUSR1: reopen its own log file and forward to the workers (access logs).
- Takeover (`runtime.takeover`): SIGUSR2 starts `serve --takeover`; a successor (single
  or supervisor) connects to `SupervisorHandover` and receives every socket of every
  slot with the lock files. Once it serves, the workers get SIGUSR2 (drain now, no
  `drain_delay`: the successor answers) and the supervisor exits 0, keeping the lock
  files. As a successor (`run_supervisor(takeover=True)`) it adopts the sockets it
  received, binds any slots missing, and confirms once every worker is ready; a start
  that fails leaves the predecessor as it was. Throttle tables and WebSockets do not
  move: the successor's tables start empty, the old workers keep their WebSockets until
  they close or the drain ends.
- Shared state (`runtime.supervisor_state`): the cross-worker throttle tables in
  /dev/shm and the private directory. Every exit path (SIGTERM, SIGINT, giving up on a crash loop, an exception)
  removes them; those of a dead supervisor (SIGKILL) are found by the pid in their
  names and removed at the next start (`remove_stale_state`).

One owner per port: the workers do not lock (they would fight each other); they inherit
the supervisor's lock descriptors, so the locks stay held until the last process serving
the ports is gone, and are removed by the supervisor after its workers exited. A worker
that cannot start makes the first start fail (exit 1) instead of a restart loop. Signals
reach only workers that reported ready; workers start with SIGHUP, SIGUSR1 and SIGUSR2 ignored.

sd_notify (`runtime.systemd`): READY=1 once every worker is up, RELOADING=1 and READY=1
around each reload, STOPPING=1 when the drain begins. Process titles:
`edgeplane: supervisor`, `edgeplane: worker I/N`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from edgeplane.config.model import Config
from edgeplane.deploy.watch import POLL_INTERVAL, StoreWatch
from edgeplane.http import native
from edgeplane.policies.throttle.slots import SlotMap
from edgeplane.runtime import listeners, logs, systemd
from edgeplane.runtime.listeners import Claim
from edgeplane.runtime.ports import fmt_address, raise_nofile_limit
from edgeplane.runtime.reload import config_hash
from edgeplane.runtime.serving import (
    ENV_SPEC,
    ENV_STATUS,
    addresses,
    ignore_quiet_signals,
    port_key,
    run_single,
    takeover_address,
    worker_raw,
)
from edgeplane.runtime.supervisor_reload import SupervisorReloads
from edgeplane.runtime.supervisor_state import SharedState, remove_stale_state
from edgeplane.runtime.takeover import Inherited, SupervisorHandover, receive_listeners, successor_argv

__all__ = ["Supervisor", "remove_stale_state", "resolve_workers", "run_single", "run_supervisor"]

log = logging.getLogger("edgeplane.workers")

_START_TIMEOUT = 120.0  # a worker that has not reported ready by then failed to start
_START_FAILURES = 5  # starts in a row that never got ready: the supervisor gives up


def resolve_workers(config: Config) -> int:
    workers = config.workers
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(workers)


# ---------------------------------------------------------------------- supervisor
class Supervisor(SupervisorReloads):
    def __init__(self, config: Config, n: int, *, overrides: dict[str, Any] | None = None,
                 inherited: Inherited | None = None, on_takeover: Any = None, on_handover: Any = None) -> None:
        self.config = config
        self.n = n
        self.overrides = overrides or {}
        # port key (`serving.port_key`) -> its listening sockets, one per worker slot, and
        # its lock (`runtime.listeners`); the workers inherit the lock descriptors
        self.claims: dict[str, Claim] = {}
        # `serve --takeover`: the predecessor's sockets, until confirmed (then its pidfile)
        self.inherited = inherited
        self.on_takeover = on_takeover
        self.on_handover = on_handover  # we handed over: the pidfile is the successor's
        self.handover: SupervisorHandover | None = None  # a successor may take ours
        self.handed_over = False  # the lock files belong to a successor now
        self.successor: subprocess.Popen[bytes] | None = None  # started by SIGUSR2
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.channels: list[socket.socket | None] = [None] * n  # control channels, once ready
        self.renew: set[int] = set()  # workers whose slot was paused: new sockets at their next start
        self.status: list[int | None] = [None] * n  # their descriptors, for select
        self.partial = [b""] * n
        self.started_at = [0.0] * n
        self.backoff = [0.5] * n
        self.failed_starts = [0] * n
        self.restart_at: dict[int, float] = {}
        # Workers to restart on the current config (a failed reload), one at a time so the
        # others keep serving meanwhile; `restarting` is the one stopped and not yet back.
        self.restart_queue: list[int] = []
        self.restarting: int | None = None
        self.signals: list[int] = []
        self.state = SharedState()  # throttle tables, the private directory
        self.slots = SlotMap.initial(config)  # where each shared limit lives (`slots`)
        self.generation = 0
        self.form_hash = ""  # config_hash of the workers' config (`_write_spec`)
        self._init_reloads()  # `supervisor_reload`

    # ------------------------------------------------------------------ ports
    def _claim_new(self, config: Config) -> list[str]:
        """Claim every address of `config` not claimed yet (from the predecessor's
        sockets on a takeover); all or none."""
        added: list[str] = []
        try:
            for kind, a in addresses(config):
                key = port_key(kind, a)
                if key in self.claims:
                    continue
                taken = self.inherited.take(kind, a.host, a.port) if self.inherited is not None else None
                if taken is not None:
                    self.claims[key] = listeners.adopt(kind, a.host, a.port, *taken, self.n)
                else:
                    self.claims[key] = listeners.claim(kind, a.host, a.port, self.n)
                added.append(key)
        except BaseException:
            self._release(added)
            raise
        return added

    def _release(self, keys: list[str]) -> None:
        # A successor holds the lock files now, or (an unconfirmed takeover) the predecessor still does.
        keep = self.handed_over or self.inherited is not None
        for key in keys:
            self.claims.pop(key).close(keep_lock_file=keep)

    def _resolved(self, key: str) -> str:
        found = self.claims[key]
        return fmt_address(found.host, found.bound)

    def _write_spec(self) -> None:
        cfg = self.config
        ports = {key: self._resolved(key) for key in self.claims}
        raw = worker_raw(cfg, ports)
        # What the workers log and count: the digest of the config they load, this one.
        self.form_hash = config_hash(dataclasses.replace(cfg, raw=raw))
        spec = {"generation": self.generation, "raw": raw, "ports": ports,
                "source": os.path.abspath(cfg.source) if not cfg.source.startswith("<") else cfg.source,
                "overrides": self.overrides, "workers": cfg.workers, "supervisor": os.getpid(),
                "slots": self.slots.for_workers(), "deployed": cfg.deployed}
        path = os.path.join(str(self.state.run_dir), "worker.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        os.replace(path + ".tmp", path)  # a worker reading it sees the old or the new, whole

    # ------------------------------------------------------------------ workers
    def _spawn(self, i: int) -> bool:
        """Start worker `i`; True once it reported its listeners bound."""
        if i in self.renew:  # its slot was paused: fresh sockets, which it listens on
            self.renew.discard(i)
            for found in self.claims.values():
                listeners.renew(found, i, self.n)
        # The control channel: status lines up, listening sockets down (`runtime.listeners`).
        channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        read_fd = channel.fileno()
        env = dict(os.environ)
        env.pop(systemd.ENV_NOTIFY, None)  # only the supervisor talks to systemd
        env[ENV_SPEC] = os.path.join(str(self.state.run_dir), "worker.json")
        env[ENV_STATUS] = str(theirs.fileno())
        env["EDGEPLANE_WORKERS"] = str(self.n)
        env.update(self.state.worker_env())
        env["EDGEPLANE_WORKER_INDEX"] = str(i)
        env[listeners.ENV_LISTEN_FDS], slot_fds = listeners.worker_fds(list(self.claims.values()), i, self.n)
        locks = [found.lock.fileno() for found in self.claims.values() if found.lock is not None]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c",
                 "from edgeplane.runtime.serving import worker_main; raise SystemExit(worker_main())"],
                env=env, pass_fds=(theirs.fileno(), *locks, *slot_fds),
                preexec_fn=ignore_quiet_signals,  # inherited through exec until the worker's loop handles them
            )
        except BaseException:
            channel.close()
            raise
        finally:
            theirs.close()
        self.procs[i] = proc
        self.started_at[i] = time.monotonic()
        # Blocks until the worker bound its sockets (or died, or hung); signals that
        # arrive meanwhile are queued in self.signals.
        line = b""
        deadline = time.monotonic() + _START_TIMEOUT
        while not line.endswith(b"\n") and time.monotonic() < deadline and not self._stop_requested():
            if select.select([read_fd], [], [], 0.5)[0]:
                chunk = os.read(read_fd, 2 - len(line))
                if not chunk:
                    break
                line += chunk
        if line != b"R\n":
            channel.close()
            self._pause_slot(i)  # it may have listened on its slot before it failed
            if proc.poll() is None:
                proc.kill()
            if not self._stop_requested():  # else it was stopped while starting: no failure
                log.error("worker %d (pid %d) failed to start", i, proc.pid)
            return False
        channel.setblocking(False)
        self.channels[i], self.status[i] = channel, read_fd
        self.partial[i] = b""
        log.info("worker %d started (pid %d)", i, proc.pid)
        return True

    def _live(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        """Workers that are serving (reported ready and not exited)."""
        return [(i, p) for i, p in enumerate(self.procs)
                if p is not None and p.poll() is None and self.status[i] is not None]

    def _signal_workers(self, sig: int) -> None:
        for _, proc in self._live():
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        raise_nofile_limit()
        systemd.set_title("edgeplane: supervisor")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, lambda s, f: self.signals.append(s))
        code = 1
        self._watch_store(wake_w)
        try:
            remove_stale_state()
            self._claim_new(self.config)
            self.state.create(self.config, self.n, self.slots)
            self._write_spec()
            for i in range(self.n):
                if self._stop_requested():
                    break
                if not self._spawn(i) and not self._stop_requested():
                    # Its reason is on stderr above; restarting would only repeat it.
                    raise OSError(f"worker {i} failed to start (its error is above)")
            if self.inherited is not None and not self._stop_requested():
                self._confirm_takeover(self.inherited)
            code = 0 if self._stop_requested() else self._supervise(wake_r)
        finally:  # every exit path: no worker, table, directory or lock is left behind
            signal.set_wakeup_fd(old_wakeup)
            if self.inherited is not None:
                self.inherited.abandon()  # the predecessor keeps serving on its sockets
            if self.handover is not None:
                self.handover.close()
            code = max(code, self._shutdown())
            os.close(wake_r)
            os.close(wake_w)
            # Stopped: a second stop signal must not kill the process while it exits.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        return code

    # ------------------------------------------------------------------ takeover
    def _confirm_takeover(self, inherited: Inherited) -> None:
        inherited.confirm()  # the lock files name us; the predecessor drains its workers
        self.inherited = None
        if self.on_takeover is not None:
            self.on_takeover()  # the pidfile names us only now
        log.info("took over the listeners of pid %d", inherited.pid)

    def _start_handover(self) -> None:
        def listeners_now() -> list[Any]:
            return [(c.kind, c.host, c.port, c.sockets, c.lock) for c in self.claims.values()]

        def committed() -> None:
            self.handed_over = True
            if self.on_handover is not None:
                self.on_handover()

        self.handover = SupervisorHandover(listeners_now, committed)
        try:
            self.handover.start()
        except OSError as exc:  # an unusable lock directory: serving matters more than upgrades
            log.warning("takeover unavailable (serve --takeover, SIGUSR2 will not find this "
                        "instance): %s", exc)
            self.handover = None

    def _spawn_successor(self) -> None:
        if self.successor is not None and self.successor.poll() is None:
            log.warning("SIGUSR2: a successor (pid %d) is already starting", self.successor.pid)
            return
        self.successor = subprocess.Popen(successor_argv(), start_new_session=True)  # outlives us
        log.info("SIGUSR2: started a successor (pid %d) to take over the listeners", self.successor.pid)

    def _reap_successor(self) -> None:
        if self.successor is None or self.successor.poll() is None:
            return
        if self.successor.returncode != 0 and not self.handed_over:
            log.error("the successor (pid %d) exited with %d before taking over; still serving",
                      self.successor.pid, self.successor.returncode)
        self.successor = None

    def _watch_store(self, wake_fd: int) -> None:
        """A deploy, rollback or canary change in the store reloads, as a SIGHUP does
        (`deploy.watch`); polled on a thread so a slow Redis never holds this loop."""
        watch = StoreWatch(self.config)

        def poll() -> None:
            while True:
                time.sleep(POLL_INTERVAL)
                watch.serving(self.config)
                if watch.changed():
                    self.signals.append(signal.SIGHUP)
                    with contextlib.suppress(OSError):
                        os.write(wake_fd, b"d")

        threading.Thread(target=poll, name="edgeplane-deploy-watch", daemon=True).start()

    def _supervise(self, wake_fd: int) -> int:
        admin = self.config.admin.listen
        addrs = ", ".join(self._resolved(port_key("data", a)) for a in self.config.listen)
        admin_text = f"; admin {self._resolved(port_key('admin', admin))}" if admin is not None else ""
        parser = native.describe(self.config.parser)
        logs.announce(f"edgeplane ready: {self.n} workers on {addrs}{admin_text}; {parser}", self.config.log_format)
        systemd.ready(f"{self.n} workers")
        self._start_handover()
        while True:
            handover = self.handover.filenos() if self.handover is not None else []
            fds = [wake_fd, *(fd for fd in self.status if fd is not None), *handover]
            readable = select.select(fds, [], [], 0.2)[0]
            if wake_fd in readable:
                _drain_fd(wake_fd)
            if self.handover is not None:
                self.handover.on_readable(readable, time.monotonic())
                if self.handed_over:
                    return 0  # `_shutdown` drains the workers at once, keeping the lock files
            while self.signals:
                sig = self.signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    return 0
                if sig == signal.SIGHUP:
                    self._reload()
                elif sig == signal.SIGUSR1:
                    log.info("SIGUSR1: reopened %d log file(s); forwarding to the workers", logs.reopen())
                    self._signal_workers(signal.SIGUSR1)
                elif sig == signal.SIGUSR2:
                    self._spawn_successor()
            self._reap_successor()
            self._read_statuses()
            if self._reap():
                return 1
            self._check_reload()
            self._advance_restarts()

    def _stop_requested(self) -> bool:
        return any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals)

    def _reap(self) -> bool:
        """Restart exited workers; True when the supervisor gives up (a crash loop)."""
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc is None or proc.poll() is None:
                continue
            if i in self.restart_at:
                if now < self.restart_at[i] or self._stop_requested():
                    continue
                del self.restart_at[i]
                started = self._spawn(i)
                if self.restarting == i:
                    self.restarting = None  # the next one in the queue may go
                if started:
                    self.failed_starts[i] = 0
                    continue
                self.failed_starts[i] += 1
                serving = any(p is not None and p.poll() is None for j, p in enumerate(self.procs) if j != i)
                if self.failed_starts[i] >= _START_FAILURES and not serving:
                    # Every worker is down: a crash loop. While others serve, keep retrying
                    # (with backoff): a file it reads may be back (a JWKS being rewritten).
                    log.error("worker %d failed to start %d times in a row; the supervisor gives up",
                              i, self.failed_starts[i])
                    return True
                continue  # its exit is seen (and its restart scheduled) on the next pass
            self._close_status(i)
            self.pending.pop(i, None)  # it restarts on the newest config
            if self._stop_requested():
                return False  # the process group got the stop too: not a crash
            if i == self.restarting:
                log.info("worker %d (pid %d) stopped; starting it on config %s", i, proc.pid, self.form_hash)
                self.restart_at[i] = now
                continue
            # Until a worker serves its slot again, new connections go to the other workers.
            self._pause_slot(i)
            if now - self.started_at[i] > 30:
                self.backoff[i] = 0.5
            # Exit 0 or SIGTERM: someone stopped that worker on purpose; anything else crashed.
            level = logging.WARNING if proc.returncode in (0, -signal.SIGTERM) else logging.ERROR
            log.log(level, "worker %d (pid %d) exited with %s; restarting in %.1fs",
                    i, proc.pid, proc.returncode, self.backoff[i])
            self.restart_at[i] = now + self.backoff[i]
            self.backoff[i] = min(self.backoff[i] * 2, 10.0)
        return False

    def _pause_slot(self, i: int) -> None:
        """Worker i is down: its slot stops taking connections (`listeners.pause`) until
        its successor listens on it. Never while a takeover shares the sockets (a
        successor may serve them already)."""
        handing_over = self.handover is not None and self.handover.busy
        if self.inherited is None and not self.handed_over and not handing_over:
            for found in self.claims.values():
                listeners.pause(listeners.slots(found, i, self.n))
            self.renew.add(i)

    def _close_status(self, i: int) -> None:
        channel = self.channels[i]
        if channel is not None:
            channel.close()
        self.channels[i] = self.status[i] = None

    # ------------------------------------------------------------------ stop
    def _shutdown(self) -> int:
        systemd.stopping()
        cfg = self.config
        if self.handed_over:
            log.info("handed over to a successor; draining %d workers", self.n)
        elif any(proc is not None for proc in self.procs):
            log.info("supervisor stopping: draining %d workers", self.n)
        # SIGUSR2 to a worker: handed over, drain now (no drain_delay: the successor serves)
        shared = self.handed_over or self.inherited is not None  # with a successor or a predecessor
        stop_signal = signal.SIGUSR2 if shared else signal.SIGTERM
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(stop_signal)
        if not shared:
            # The workers stop accepting after `drain_delay`; so do the data listeners
            # then: new connections are refused, not queued until the drain ends. The
            # admin listener stays (health checks follow the drain) until the workers exit.
            until = time.monotonic() + cfg.drain_delay
            while time.monotonic() < until and any(p is not None and p.poll() is None for p in self.procs):
                time.sleep(0.05)
            for found in self.claims.values():
                if found.kind != "admin":
                    listeners.pause(found.sockets)
        deadline = time.monotonic() + cfg.drain_delay + cfg.drain_timeout + 5
        code = 0
        waiting = {i: proc for i, proc in enumerate(self.procs) if proc is not None}
        while waiting:
            for i, proc in list(waiting.items()):
                if proc.poll() is not None:
                    # Its slots (the admin one too) stop taking connections nobody accepts.
                    if not shared:
                        for found in self.claims.values():
                            listeners.pause(listeners.slots(found, i, self.n))
                    self._close_status(i)
                    del waiting[i]
            if waiting and time.monotonic() >= deadline:
                for i, proc in waiting.items():
                    log.error("worker pid %d did not drain in time; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
                    self._close_status(i)
                code = 1
                break
            time.sleep(0.05)
        self.state.remove()
        self._release(list(self.claims))  # the workers that shared the locks have exited
        return code


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def run_supervisor(config: Config, n: int, *, overrides: dict[str, Any] | None = None,
                   takeover: bool = False, on_takeover: Any = None, on_handover: Any = None) -> int:
    """Run N workers until SIGTERM/SIGINT (see the module docstring). `takeover`: inherit
    the listeners of the instance that owns them (`runtime.takeover`), single or not."""
    inherited = None
    if takeover:
        inherited = receive_listeners(*takeover_address(config))
    return Supervisor(config, n, overrides=overrides, inherited=inherited, on_takeover=on_takeover,
                      on_handover=on_handover).run()
