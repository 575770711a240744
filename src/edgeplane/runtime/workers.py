"""Processes: one worker in this process, or a supervisor over N worker processes.

Owns process lifecycle:
- `run_single(config)`: one event loop (uvloop) running a `Gateway`; SIGTERM/SIGINT drain
  (stop accepting, finish in-flight requests within `drain_timeout`, close idle
  keep-alive connections) and exit 0. The gateway locks its listen addresses.
- `run_supervisor(config, n)`: N worker processes, each binding its own listening socket
  with SO_REUSEPORT so the kernel spreads connections across them. The supervisor first
  claims every address (data, TLS, admin) with `ports.claim_placeholder`: its lock file,
  and a placeholder socket bound (not listening) exclusively before SO_REUSEPORT is set,
  so a port held by anyone else fails here, named, and port 0 is resolved once for all
  workers. It restarts a worker that dies (with backoff), and on SIGTERM forwards it to
  every worker, waits for them to drain, and exits 0.

One owner per port: the workers do not lock (they would fight each other); they inherit
the supervisor's lock descriptors, so the locks stay held until the last process serving
the ports is gone, and are removed by the supervisor after its workers exited. A worker
that cannot start makes the first start fail (exit 1) instead of a restart loop.

Both the single process and the supervisor lift the soft RLIMIT_NOFILE to the hard limit
at start (workers inherit it).

Workers learn their config from the environment (`EDGEPLANE_WORKER_CONFIG`, JSON of the
raw config with resolved ports) and report readiness by writing one byte to the pipe
named by `EDGEPLANE_READY_FD`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from edgeplane.config.loader import load_config
from edgeplane.config.model import Config
from edgeplane.policies.throttle.shared_keys import SharedKeyTable
from edgeplane.policies.throttle.shared_limits import SharedLimitTable
from edgeplane.policies.throttle.stores import plans_of, shared_limit_count
from edgeplane.runtime.gateway import Gateway
from edgeplane.runtime.logs import setup_logging
from edgeplane.runtime.ports import ListenerLock, claim_placeholder, fmt_address, raise_nofile_limit

log = logging.getLogger("edgeplane.workers")

ENV_CONFIG = "EDGEPLANE_WORKER_CONFIG"
ENV_READY = "EDGEPLANE_READY_FD"
ENV_SHARED = "EDGEPLANE_SHARED_LIMITS"  # name of the cross-worker throttle table
ENV_SHARED_KEYS = "EDGEPLANE_SHARED_KEYS"  # name of the per-client (keyed) table, if any


def resolve_workers(config: Config) -> int:
    workers = config.workers
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(workers)


# ---------------------------------------------------------------------- one process
def _ws_worker_from_env() -> tuple[int, str, bytes] | None:
    """(worker index, socket directory, host tag) the supervisor gave this worker for
    WebSocket APIs, or None outside a supervisor."""
    env = os.environ
    if env.get("EDGEPLANE_WORKER_INDEX", "").isdigit() and env.get("EDGEPLANE_WS_SOCKET_DIR") \
            and env.get("EDGEPLANE_WS_HOST_TAG"):
        return (int(env["EDGEPLANE_WORKER_INDEX"]), env["EDGEPLANE_WS_SOCKET_DIR"],
                bytes.fromhex(env["EDGEPLANE_WS_HOST_TAG"]))
    return None


async def _serve(config: Config, reuse_port: bool, ready_fd: int | None,
                 shared_limits: tuple[str, int, str | None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A worker (reuse_port) serves under its supervisor's locks; a single process owns its own.
    gateway = Gateway(config, reuse_port=reuse_port, lock_ports=not reuse_port,
                      shared_limits=shared_limits, ws_worker=_ws_worker_from_env())
    await gateway.start()
    # Everything built at start-up (config, snapshot, modules) lives for the whole
    # process: move it out of the collector's generations so a collection only walks
    # objects made since. Per-request objects are freed by reference counting.
    gc.collect()
    gc.freeze()
    if ready_fd is not None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)
        _exit_with_supervisor(loop, stop)
    else:
        addrs = ", ".join(fmt_address(h, p) for h, p in gateway.addresses)
        admin = f"; admin {fmt_address(*gateway.admin_address)}" if gateway.admin_address else ""
        print(f"edgeplane ready: 1 worker on {addrs}{admin}", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("draining (up to %.1fs)", config.drain_timeout)
    await gateway.stop()


def _exit_with_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """A worker drains and exits if its supervisor dies (even by SIGKILL): no orphans
    keep serving a port nobody manages."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            log.error("supervisor (pid %d) is gone; draining", parent)
            stop.set()
        else:
            loop.call_later(1.0, check)

    loop.call_later(1.0, check)


def run_single(config: Config, *, reuse_port: bool = False, ready_fd: int | None = None,
               shared_limits: tuple[str, int, str | None] | None = None) -> int:
    if ready_fd is None:  # not a worker: a worker inherits its supervisor's limit
        raise_nofile_limit()
    uvloop.run(_serve(config, reuse_port, ready_fd, shared_limits))
    return 0


def worker_main() -> int:
    """Entry point of a worker process started by the supervisor."""
    raw = json.loads(os.environ[ENV_CONFIG])
    config = load_config(raw)
    setup_logging(config.log_level)
    ready = os.environ.get(ENV_READY)
    shared = os.environ.get(ENV_SHARED)
    index = int(os.environ.get("EDGEPLANE_WORKER_INDEX", "0"))
    keys = os.environ.get(ENV_SHARED_KEYS)
    try:
        return run_single(config, reuse_port=True, ready_fd=int(ready) if ready else None,
                          shared_limits=(shared, index, keys) if shared else None)
    except OSError as exc:  # a bind error names its listener: one line, not a traceback
        print(f"edgeplane worker {index} (pid {os.getpid()}): cannot start: {exc}", file=sys.stderr, flush=True)
        return 1


# ---------------------------------------------------------------------- supervisor
class Supervisor:
    def __init__(self, config: Config, n: int) -> None:
        self.config = config
        self.n = n
        self.placeholders: list[socket.socket] = []
        self.locks: list[ListenerLock] = []  # one per listen address; inherited by the workers
        self.worker_raw: dict[str, Any] = {}
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.started_at = [0.0] * n
        self.backoff = [0.5] * n
        self.stopping = False
        self.shared_table: SharedLimitTable | None = None
        self.keyed_table: SharedKeyTable | None = None
        self.ws_dir: str | None = None  # WebSocket APIs: the workers' admin sockets
        self.ws_host_tag = ""

    def _resolve_ports(self) -> None:
        """Claim every listen address and give the workers the resolved ports."""
        cfg = self.config
        raw = json.loads(json.dumps(cfg.raw))
        raw["listen"] = [self._claim("data", a.host, a.port) for a in cfg.listen]
        if cfg.tls is not None:
            raw["tls"]["listen"] = [self._claim("TLS", a.host, a.port) for a in cfg.tls.listen]
        if cfg.admin.listen is not None:
            a = cfg.admin.listen
            raw.setdefault("admin", {})["listen"] = self._claim("admin", a.host, a.port)
        raw["workers"] = 1
        self.worker_raw = raw

    def _claim(self, kind: str, host: str, port: int) -> str:
        sock, lock = claim_placeholder(kind, host, port)
        self.placeholders.append(sock)
        if lock is not None:
            self.locks.append(lock)
        return fmt_address(host, sock.getsockname()[1])

    def _spawn(self, i: int) -> bool:
        """Start worker `i`; True once it reported its listeners bound."""
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[ENV_CONFIG] = json.dumps(self.worker_raw)
        env[ENV_READY] = str(write_fd)
        if self.shared_table is not None:
            env[ENV_SHARED] = self.shared_table.name
        if self.keyed_table is not None:
            env[ENV_SHARED_KEYS] = self.keyed_table.name
        if self.ws_dir is not None:
            env["EDGEPLANE_WS_SOCKET_DIR"] = self.ws_dir
            env["EDGEPLANE_WS_HOST_TAG"] = self.ws_host_tag
        env["EDGEPLANE_WORKER_INDEX"] = str(i)
        proc = subprocess.Popen(
            [sys.executable, "-c",
             "from edgeplane.runtime.workers import worker_main; raise SystemExit(worker_main())"],
            env=env, pass_fds=(write_fd, *(lock.fileno() for lock in self.locks)),
        )
        os.close(write_fd)
        self.procs[i] = proc
        self.started_at[i] = time.monotonic()
        ready = os.read(read_fd, 1)  # blocks until the worker bound its sockets (or died)
        os.close(read_fd)
        if ready != b"R":
            log.error("worker %d (pid %d) failed to start", i, proc.pid)
            return False
        log.info("worker %d started (pid %d)", i, proc.pid)
        return True

    def run(self) -> int:
        raise_nofile_limit()
        try:
            self._resolve_ports()
            self._create_shared_state()
            stop_signal: list[int] = []
            signal.signal(signal.SIGTERM, lambda s, f: stop_signal.append(s))
            signal.signal(signal.SIGINT, lambda s, f: stop_signal.append(s))
            for i in range(self.n):
                if not self._spawn(i):
                    # Its reason is on stderr above; restarting would only repeat it.
                    raise OSError(f"worker {i} failed to start (its error is above)")
        except BaseException:
            self._shutdown()  # no table, directory or worker is left behind
            raise
        self._supervise(stop_signal)
        return self._shutdown()

    def _create_shared_state(self) -> None:
        cfg = self.config
        plan_limits = any(p.throttle or p.route_throttles for p in plans_of(cfg).values())
        route_throttles = [r.policies["throttle"] for r in cfg.routes if "throttle" in r.policies]
        if cfg.cluster is None and (cfg.policies.get("throttle") is not None or route_throttles
                                    or plan_limits or cfg.websocket_apis):
            # Tables for the whole server, so every limit holds across workers (indices:
            # 0 = server-wide, 1 + i = routes[i], then the usage plans, then the WebSocket
            # APIs' new-connection buckets; see limits.py).
            n_limits = shared_limit_count(cfg)
            self.shared_table = SharedLimitTable.create(f"edgeplane-{os.getpid()}", self.n, n_limits)
            if plan_limits or any(t.key for t in route_throttles):
                self.keyed_table = SharedKeyTable.create(f"edgeplane-{os.getpid()}-keys", self.n, n_limits)
        if cfg.websocket_apis:
            # @connections calls reach the worker that holds a connection through its
            # Unix socket in this private directory; the host tag goes into every id.
            self.ws_dir = tempfile.mkdtemp(prefix=f"edgeplane-{os.getpid()}-")
            self.ws_host_tag = os.urandom(4).hex()

    def _supervise(self, stop_signal: list[int]) -> None:
        addrs = ", ".join(self.worker_raw["listen"])
        admin = self.worker_raw.get("admin", {}).get("listen")
        admin = f"; admin {admin}" if admin else ""
        print(f"edgeplane ready: {self.n} workers on {addrs}{admin}", file=sys.stderr, flush=True)
        restart_at: dict[int, float] = {}
        while not stop_signal:
            time.sleep(0.1)
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if i not in restart_at:
                    uptime = now - self.started_at[i]
                    if uptime > 30:
                        self.backoff[i] = 0.5
                    log.error("worker %d (pid %d) exited with %s; restarting in %.1fs",
                              i, proc.pid, proc.returncode, self.backoff[i])
                    restart_at[i] = now + self.backoff[i]
                    self.backoff[i] = min(self.backoff[i] * 2, 10.0)
                elif now >= restart_at[i] and not stop_signal:
                    del restart_at[i]
                    self._spawn(i)

    def _shutdown(self) -> int:
        if any(proc is not None for proc in self.procs):
            log.info("supervisor stopping: draining %d workers", self.n)
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + 5
        code = 0
        for proc in self.procs:
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
        if self.ws_dir is not None:
            shutil.rmtree(self.ws_dir, ignore_errors=True)
            self.ws_dir = None
        for sock in self.placeholders:
            sock.close()
        self.placeholders.clear()
        for lock in self.locks:  # the workers that shared them have exited
            lock.release()
        self.locks.clear()
        return code


def run_supervisor(config: Config, n: int) -> int:
    return Supervisor(config, n).run()
