"""The supervisor of `workers: N`: N worker processes (`runtime.serving`) on shared ports.

Owns the worker processes and what they share:
- Ports: the supervisor first claims every address (data, TLS, admin) with
  `ports.claim_placeholder`: its lock file, and a placeholder socket bound (not
  listening) exclusively before SO_REUSEPORT is set, so a port held by anyone else fails
  here, named, and port 0 is resolved once for all workers. Each worker binds its own
  listening socket with SO_REUSEPORT, so the kernel spreads connections across them.
- Life: it restarts a worker that dies (with backoff; it gives up, exiting 1, after
  `_START_FAILURES` starts in a row that never got ready), and on SIGTERM/SIGINT
  forwards SIGTERM to every worker, waits for them to drain, and exits 0. A worker that
  exits 0 or on SIGTERM was stopped on purpose (the process group got the signal): a
  warning, not an error; a stop signal seen first means no restart and no line at all.
- Reload (SIGHUP): the supervisor loads and validates the file once (`load_config` with
  the CLI's overrides, then `reload.refusals`, as if every limit lived in the shared
  tables, which it does with workers > 1). Refused: every error is logged by location
  and nothing changes. Accepted: it claims the addresses the new config adds, writes the
  workers' spec (`worker.json` in its private directory: a new generation, the worker
  form of the config) and sends SIGHUP to each worker, which reloads from it and answers
  on its status pipe. A worker that fails to apply it, or has not answered in
  `_RELOAD_TIMEOUT`, is stopped and restarted on the new config. Addresses the new
  config dropped are released once every worker answered.
- SIGUSR1: reopen its own log file and forward to the workers (access logs).
- Shared state: the cross-worker throttle tables in /dev/shm (`edgeplane-<pid>`,
  `edgeplane-<pid>-keys`) and the private directory (`edgeplane-<pid>-*` in the temp
  dir). Every exit path (SIGTERM, SIGINT, giving up on a crash loop, an exception)
  removes them; those of a dead supervisor (SIGKILL) are found by the pid in their
  names and removed at the next start (`remove_stale_state`).

One owner per port: the workers do not lock (they would fight each other); they inherit
the supervisor's lock descriptors, so the locks stay held until the last process serving
the ports is gone, and are removed by the supervisor after its workers exited. A worker
that cannot start makes the first start fail (exit 1) instead of a restart loop. Signals
reach only workers that reported ready; workers start with SIGHUP and SIGUSR1 ignored.

sd_notify (`runtime.systemd`): READY=1 once every worker is up, RELOADING=1 and READY=1
around each reload, STOPPING=1 when the drain begins. Process titles:
`edgeplane: supervisor`, `edgeplane: worker I/N`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from edgeplane.config.loader import ConfigError, load_config
from edgeplane.config.model import Config
from edgeplane.policies.throttle.shared_keys import SharedKeyTable
from edgeplane.policies.throttle.shared_limits import SHM_DIR, SharedLimitTable
from edgeplane.policies.throttle.stores import plans_of, shared_limit_count
from edgeplane.runtime import logs, systemd
from edgeplane.runtime.ports import ListenerLock, claim_placeholder, fmt_address, raise_nofile_limit
from edgeplane.runtime.reload import ReloadRefused, config_hash, refusals, reload_source
from edgeplane.runtime.serving import (
    ENV_SHARED,
    ENV_SHARED_KEYS,
    ENV_SPEC,
    ENV_STATUS,
    addresses,
    ignore_quiet_signals,
    log_refused,
    needs_shared_tables,
    port_key,
    run_single,
    worker_raw,
)

__all__ = ["Supervisor", "remove_stale_state", "resolve_workers", "run_single", "run_supervisor"]

log = logging.getLogger("edgeplane.workers")

_RELOAD_TIMEOUT = 60.0  # a worker that has not applied a reload by then is restarted
_START_TIMEOUT = 120.0  # a worker that has not reported ready by then failed to start
_START_FAILURES = 5  # starts in a row that never got ready: the supervisor gives up


def resolve_workers(config: Config) -> int:
    workers = config.workers
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(workers)


# ---------------------------------------------------------------------- stale state
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


# ---------------------------------------------------------------------- supervisor
class Supervisor:
    def __init__(self, config: Config, n: int, *, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.n = n
        self.overrides = overrides or {}
        # port key (`serving.port_key`) -> (resolved address, placeholder socket, lock); the
        # locks are inherited by the workers
        self.claims: dict[str, tuple[str, socket.socket, ListenerLock | None]] = {}
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.status: list[int | None] = [None] * n  # read ends of the status pipes, once ready
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
        self.shared_table: SharedLimitTable | None = None
        self.keyed_table: SharedKeyTable | None = None
        self.run_dir: str | None = None  # private (0700): worker.json, WebSocket sockets
        self.ws_dir: str | None = None  # WebSocket APIs: the workers' admin sockets
        self.ws_host_tag = ""
        self.generation = 0
        self.form_hash = ""  # config_hash of the workers' config (`_write_spec`)
        self.pending: dict[int, int] = {}  # worker -> generation it has not confirmed yet
        self.reload_started: float | None = None
        self.reload_wanted = False  # a SIGHUP during a reload: one more after it
        self.release_after: list[str] = []  # claims the new config dropped

    # ------------------------------------------------------------------ ports
    def _claim_new(self, config: Config) -> list[str]:
        """Claim every address of `config` not claimed yet; all or none."""
        added: list[str] = []
        try:
            for kind, a in addresses(config):
                key = port_key(kind, a)
                if key not in self.claims:
                    sock, lock = claim_placeholder(kind, a.host, a.port)
                    self.claims[key] = (fmt_address(a.host, sock.getsockname()[1]), sock, lock)
                    added.append(key)
        except BaseException:
            self._release(added)
            raise
        return added

    def _release(self, keys: list[str]) -> None:
        for key in keys:
            _, sock, lock = self.claims.pop(key)
            sock.close()
            if lock is not None:  # a worker may hold its inherited copy: the file goes now
                lock.release()

    def _write_spec(self) -> None:
        cfg = self.config
        ports = {key: resolved for key, (resolved, _, _) in self.claims.items()}
        raw = worker_raw(cfg, ports)
        # What the workers log and count: the digest of the config they load, this one.
        self.form_hash = config_hash(dataclasses.replace(cfg, raw=raw))
        spec = {"generation": self.generation, "raw": raw, "ports": ports,
                "source": os.path.abspath(cfg.source) if not cfg.source.startswith("<") else cfg.source,
                "overrides": self.overrides, "workers": cfg.workers, "supervisor": os.getpid()}
        path = os.path.join(str(self.run_dir), "worker.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        os.replace(path + ".tmp", path)  # a worker reading it sees the old or the new, whole

    # ------------------------------------------------------------------ workers
    def _spawn(self, i: int) -> bool:
        """Start worker `i`; True once it reported its listeners bound."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.pop(systemd.ENV_NOTIFY, None)  # only the supervisor talks to systemd
        env[ENV_SPEC] = os.path.join(str(self.run_dir), "worker.json")
        env[ENV_STATUS] = str(write_fd)
        env["EDGEPLANE_WORKERS"] = str(self.n)
        if self.shared_table is not None:
            env[ENV_SHARED] = self.shared_table.name
        if self.keyed_table is not None:
            env[ENV_SHARED_KEYS] = self.keyed_table.name
        if self.ws_dir is not None:
            env["EDGEPLANE_WS_SOCKET_DIR"] = self.ws_dir
            env["EDGEPLANE_WS_HOST_TAG"] = self.ws_host_tag
        env["EDGEPLANE_WORKER_INDEX"] = str(i)
        locks = [lock.fileno() for _, _, lock in self.claims.values() if lock is not None]
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "from edgeplane.runtime.serving import worker_main; raise SystemExit(worker_main())"],
            env=env, pass_fds=(write_fd, *locks),
            preexec_fn=ignore_quiet_signals,  # inherited through exec until the worker's loop handles them
        )
        os.close(write_fd)
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
            os.close(read_fd)
            if proc.poll() is None:
                proc.kill()
            if not self._stop_requested():  # else it was stopped while starting: no failure
                log.error("worker %d (pid %d) failed to start", i, proc.pid)
            return False
        os.set_blocking(read_fd, False)
        self.status[i] = read_fd
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
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda s, f: self.signals.append(s))
        code = 1
        try:
            remove_stale_state()
            self._claim_new(self.config)
            self._create_shared_state()
            self._write_spec()
            for i in range(self.n):
                if self._stop_requested():
                    break
                if not self._spawn(i) and not self._stop_requested():
                    # Its reason is on stderr above; restarting would only repeat it.
                    raise OSError(f"worker {i} failed to start (its error is above)")
            code = 0 if self._stop_requested() else self._supervise(wake_r)
        finally:  # every exit path: no worker, table, directory or lock is left behind
            signal.set_wakeup_fd(old_wakeup)
            code = max(code, self._shutdown())
            os.close(wake_r)
            os.close(wake_w)
        return code

    def _create_shared_state(self) -> None:
        cfg = self.config
        plan_limits = any(p.throttle or p.route_throttles for p in plans_of(cfg).values())
        route_throttles = [r.policies["throttle"] for r in cfg.routes if "throttle" in r.policies]
        if needs_shared_tables(cfg):
            # Tables for the whole server, so every limit holds across workers (indices:
            # 0 = server-wide, 1 + i = routes[i], then the usage plans, then the WebSocket
            # APIs' new-connection buckets; see limits.py).
            n_limits = shared_limit_count(cfg)
            self.shared_table = SharedLimitTable.create(f"edgeplane-{os.getpid()}", self.n, n_limits)
            if plan_limits or any(t.key for t in route_throttles):
                self.keyed_table = SharedKeyTable.create(f"edgeplane-{os.getpid()}-keys", self.n, n_limits)
        self.run_dir = tempfile.mkdtemp(prefix=f"edgeplane-{os.getpid()}-")
        if cfg.websocket_apis:
            # @connections calls reach the worker that holds a connection through its
            # Unix socket in this private directory; the host tag goes into every id.
            self.ws_dir = self.run_dir
            self.ws_host_tag = os.urandom(4).hex()

    def _supervise(self, wake_fd: int) -> int:
        admin = self.config.admin.listen
        addrs = ", ".join(self.claims[port_key("data", a)][0] for a in self.config.listen)
        admin_text = f"; admin {self.claims[port_key('admin', admin)][0]}" if admin is not None else ""
        print(f"edgeplane ready: {self.n} workers on {addrs}{admin_text}", file=sys.stderr, flush=True)
        systemd.ready(f"{self.n} workers")
        while True:
            fds = [wake_fd, *(fd for fd in self.status if fd is not None)]
            readable = select.select(fds, [], [], 0.2)[0]
            if wake_fd in readable:
                _drain_fd(wake_fd)
            while self.signals:
                sig = self.signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    return 0
                if sig == signal.SIGHUP:
                    self._reload()
                elif sig == signal.SIGUSR1:
                    log.info("SIGUSR1: reopened %d log file(s); forwarding to the workers", logs.reopen())
                    self._signal_workers(signal.SIGUSR1)
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
            if now - self.started_at[i] > 30:
                self.backoff[i] = 0.5
            # Exit 0 or SIGTERM: someone stopped that worker on purpose; anything else crashed.
            level = logging.WARNING if proc.returncode in (0, -signal.SIGTERM) else logging.ERROR
            log.log(level, "worker %d (pid %d) exited with %s; restarting in %.1fs",
                    i, proc.pid, proc.returncode, self.backoff[i])
            self.restart_at[i] = now + self.backoff[i]
            self.backoff[i] = min(self.backoff[i] * 2, 10.0)
        return False

    def _close_status(self, i: int) -> None:
        fd = self.status[i]
        if fd is not None:
            os.close(fd)
            self.status[i] = None

    def _read_statuses(self) -> None:
        for i, fd in enumerate(self.status):
            if fd is None:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not data:  # the worker is exiting: `_reap` sees it
                self._close_status(i)
                continue
            *lines, self.partial[i] = (self.partial[i] + data).split(b"\n")
            for line in lines:
                kind, _, value = line.decode("ascii", "replace").partition(" ")
                if not value.isdigit() or self.pending.get(i) != int(value):
                    continue  # not the reload being waited for (a stray SIGHUP's answer)
                del self.pending[i]
                if kind == "F":
                    self._restart_on_new_config(i, "failed to apply it")

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
                proc.send_signal(signal.SIGTERM)  # it drains on the old config; its successor starts on the new

    # ------------------------------------------------------------------ reload
    def _reload(self) -> None:
        if self.reload_started is not None:
            self.reload_wanted = True  # after the one in progress
            return
        systemd.reloading()
        started = time.monotonic()
        source = self.config.source
        running = self.form_hash
        try:
            new = load_config(reload_source(source), overrides=self.overrides)
            # With workers > 1 every limit lives in the shared tables: their layout is fixed.
            tables = needs_shared_tables(self.config) or needs_shared_tables(new)
            problems = refusals(self.config, new, shared_tables=tables)
            if problems:
                raise ReloadRefused(problems)
            self._claim_new(new)
        except (ConfigError, ReloadRefused, LookupError, OSError) as exc:
            errors = (exc.located() if isinstance(exc, ConfigError) else exc.problems
                      if isinstance(exc, ReloadRefused) else [str(exc)])
            log_refused(source, running, list(errors))
            self._record_refusal(source, list(errors))
            systemd.ready()
            return
        wanted = {port_key(kind, a) for kind, a in addresses(new)}
        self.release_after += [key for key in self.claims if key not in wanted]
        self.config = new
        self.generation += 1
        self._write_spec()
        self.reload_started = started
        for i, proc in self._live():
            try:
                proc.send_signal(signal.SIGHUP)
            except ProcessLookupError:
                continue
            self.pending[i] = self.generation
        log.info("reload: config %s accepted (was %s); applying it in %d workers",
                 self.form_hash, running, len(self.pending))
        self._check_reload()

    def _record_refusal(self, source: str, errors: list[str]) -> None:
        """Workers show the supervisor's refusals in their /stats (`reloads.
        refused_by_supervisor`): the supervisor has no admin listener of its own."""
        self.refused = getattr(self, "refused", 0) + 1
        if self.run_dir is None:
            return
        path = os.path.join(self.run_dir, "refused.json")
        try:
            with open(path + ".tmp", "w") as fh:
                json.dump({"count": self.refused, "last": {"source": source, "errors": errors,
                                                           "at": time.time()}}, fh)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("could not record the refused reload for the workers' /stats: %s", exc)

    def _check_reload(self) -> None:
        if self.reload_started is None:
            return
        if self.pending and time.monotonic() - self.reload_started > _RELOAD_TIMEOUT:
            for i in list(self.pending):
                self._restart_on_new_config(i, f"did not apply the new config in {_RELOAD_TIMEOUT:.0f}s")
            self.pending.clear()
        if self.pending:
            return
        restarts = len(self.restart_queue) + (self.restarting is not None)
        log.info("reloaded config %s in %d workers in %.1f ms%s", self.form_hash, self.n - restarts,
                 (time.monotonic() - self.reload_started) * 1000,
                 f"; {restarts} restarting on it, one at a time" if restarts else "")
        self.reload_started = None
        self._release(self.release_after)  # no worker listens on them any more
        self.release_after = []
        systemd.ready(f"{self.n} workers")
        if self.reload_wanted:
            self.reload_wanted = False
            self._reload()

    # ------------------------------------------------------------------ stop
    def _shutdown(self) -> int:
        systemd.stopping()
        cfg = self.config
        if any(proc is not None for proc in self.procs):
            log.info("supervisor stopping: draining %d workers", self.n)
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + cfg.drain_delay + cfg.drain_timeout + 5
        code = 0
        for i, proc in enumerate(self.procs):
            self._close_status(i)
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
                code = 1
        for table in (self.shared_table, self.keyed_table):
            if table is not None:
                table.close()
                table.unlink()
        self.shared_table = self.keyed_table = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = self.ws_dir = None
        self._release(list(self.claims))  # the workers that shared the locks have exited
        return code


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def run_supervisor(config: Config, n: int, *, overrides: dict[str, Any] | None = None) -> int:
    return Supervisor(config, n, overrides=overrides).run()
