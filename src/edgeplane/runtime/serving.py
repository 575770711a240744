"""One serving process: the event loop, its signals and its reloads (`serve`, and each
worker of `workers: N`).

Owns the life of one process that runs a `Gateway`:
- `run_single(config)` (`workers: 1`): SIGTERM/SIGINT: not ready for `drain_delay`, then
  drain (stop accepting, finish in-flight requests within `drain_timeout`, give idle
  connections the drain grace for one more request) and exit 0. SIGUSR2: start a
  successor (`serve --takeover`) that takes the listeners; drain once it serves.
  SIGHUP: reload the config file with the CLI's overrides (`Gateway.reload`); a refused
  config is logged by location, the old one keeps serving, and the process never exits
  for it. SIGUSR1: reopen the log files. The
  gateway locks its listen addresses. sd_notify: READY=1 once serving, RELOADING=1 and
  READY=1 around a reload, STOPPING=1 when the drain begins.
- `worker_main()`: a worker started by the supervisor (`runtime.workers`). Its config is
  the supervisor's spec file (`ENV_SPEC`: JSON with a generation, the worker form of the
  config, the ports the supervisor claimed); it serves the listening sockets the
  supervisor gave it (`runtime.listeners`) and reports on its control channel (`ENV_STATUS`):
  `R` once serving, then `K <generation>` / `F <generation>` per reload. SIGHUP reloads
  from the spec file when its generation is newer than the one served (a stray SIGHUP
  changes nothing but still answers). `POST /config/reload` on its admin listener
  validates the file as the supervisor will (`load_config`, then `reload.refusals` in the
  worker form), then sends SIGHUP to the supervisor and answers with the outcome the
  supervisor records (`supervisor_state`). SIGUSR2 from the supervisor: a successor
  took over; drain now, without `drain_delay`.

Invariants: SIGHUP and SIGUSR1 are ignored from the start of the process until the
loop's handlers are installed (their default action would kill it); one reload runs at a
time (a signal during one runs one more after it); only a process systemd started
notifies it (the supervisor gives its workers no NOTIFY_SOCKET).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import uvloop

from edgeplane.config.loader import ConfigError, load_config
from edgeplane.config.model import Config, ListenAddress
from edgeplane.deploy.served import attach, load_served
from edgeplane.deploy.watch import POLL_INTERVAL, StoreWatch
from edgeplane.http import native
from edgeplane.policies.throttle.slots import SlotMap
from edgeplane.runtime import logs, systemd
from edgeplane.runtime.gateway import Gateway
from edgeplane.runtime.listeners import Provided, provided_from_env, receive_added
from edgeplane.runtime.ports import fmt_address, raise_nofile_limit
from edgeplane.runtime.reload import ReloadRefused, config_hash, refusals, reload_source
from edgeplane.runtime.supervisor_state import (
    APPLIED,
    ENV_SHARED,
    ENV_SHARED_KEYS,
    REFUSED,
    read_outcome,
)
from edgeplane.runtime.takeover import HandoverServer, TakeoverError, receive_listeners, successor_argv

log = logging.getLogger("edgeplane.workers")

ENV_SPEC = "EDGEPLANE_WORKER_SPEC"  # path of the supervisor's worker.json
ENV_STATUS = "EDGEPLANE_STATUS_FD"  # the worker's end of its control channel
_ADMIN_RELOAD_WAIT = 30.0  # how long `POST /config/reload` in a worker waits for the outcome
_QUIET = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)  # ignored until a handler is installed


def ignore_quiet_signals() -> None:
    """SIGHUP, SIGUSR1 and SIGUSR2 do nothing until the serving loop handles them (their
    default action kills the process: a reload, a log rotation or an upgrade must never
    do that)."""
    for sig in _QUIET:
        signal.signal(sig, signal.SIG_IGN)


def worker_raw(config: Config, ports: dict[str, str]) -> dict[str, Any]:
    """The raw config a worker loads: `config` with each listen address replaced by the
    port the supervisor claimed for it (`ports`, keyed by `port_key`) and `workers: 1`."""
    raw: dict[str, Any] = json.loads(json.dumps(config.raw))

    def resolved(kind: str, a: ListenAddress) -> str:
        return ports.get(port_key(kind, a), fmt_address(a.host, a.port))

    raw["listen"] = [resolved("data", a) for a in config.listen]
    if config.tls is not None:
        raw["tls"]["listen"] = [resolved("TLS", a) for a in config.tls.listen]
    if config.admin.listen is not None:
        raw.setdefault("admin", {})["listen"] = resolved("admin", config.admin.listen)
    raw["workers"] = 1
    return raw


def port_key(kind: str, a: ListenAddress) -> str:
    return f"{kind} {fmt_address(a.host, a.port)}"


def addresses(config: Config) -> list[tuple[str, ListenAddress]]:
    out = [("data", a) for a in config.listen]
    if config.tls is not None:
        out += [("TLS", a) for a in config.tls.listen]
    if config.admin.listen is not None:
        out.append(("admin", config.admin.listen))
    return out


def _ws_worker_from_env() -> tuple[int, str, bytes] | None:
    """(worker index, socket directory, host tag) the supervisor gave this worker for
    WebSocket APIs, or None outside a supervisor."""
    env = os.environ
    if env.get("EDGEPLANE_WORKER_INDEX", "").isdigit() and env.get("EDGEPLANE_WS_SOCKET_DIR") \
            and env.get("EDGEPLANE_WS_HOST_TAG"):
        return (int(env["EDGEPLANE_WORKER_INDEX"]), env["EDGEPLANE_WS_SOCKET_DIR"],
                bytes.fromhex(env["EDGEPLANE_WS_HOST_TAG"]))
    return None


class _WorkerLink:
    """A worker's side of its supervisor: the spec file, the control channel (status
    lines up, listening sockets down), the sockets it was given, its generation."""

    def __init__(self, spec_path: str, status_fd: int, generation: int, provided: Provided) -> None:
        self.spec_path = spec_path
        self.status_fd = status_fd
        self.generation = generation  # of the config this worker serves
        self.provided = provided  # what the worker's Gateway binds from (`runtime.listeners`)

    def report(self, line: str) -> None:
        try:
            os.write(self.status_fd, f"{line}\n".encode())
        except OSError:  # the supervisor is gone: `_exit_with_supervisor` drains this worker
            pass


def read_spec(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec: dict[str, Any] = json.load(f)
    return spec


class _Reloads:
    """SIGHUP and `POST /config/reload` of one process, one reload at a time (a signal
    during a reload runs one more after it)."""

    def __init__(self, gateway: Gateway, overrides: dict[str, Any], link: _WorkerLink | None) -> None:
        self.gateway = gateway
        self.overrides = overrides
        self.link = link
        self.task: asyncio.Task[None] | None = None
        self.watch_task: asyncio.Task[None] | None = None
        self.again = False

    async def watch_store(self) -> None:
        """One process: a deploy, rollback or canary change in the store reloads, as a
        SIGHUP does (`deploy.watch`)."""
        watch = StoreWatch(self.gateway.config)
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            watch.serving(self.gateway.config)
            if watch.store is not None and await asyncio.to_thread(watch.changed):
                self.on_signal()

    def on_signal(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.again = False
            try:
                if self.link is not None:
                    await self._from_supervisor(self.link)
                else:
                    await self.from_file()
            except (ConfigError, ReloadRefused):
                pass  # logged by location where it was raised
            except LookupError as exc:
                log.error("reload: %s", exc)
            except Exception:
                log.exception("reload failed; the running config keeps serving")
            if not self.again:
                return

    async def from_file(self) -> dict[str, Any]:
        """One process: reload the file the config came from, with the CLI's overrides."""
        gateway = self.gateway
        source = reload_source(gateway.config.source)
        systemd.reloading()
        try:
            if not self.overrides:
                return await gateway.reload(source)  # loads, logs and counts a refusal itself
            try:
                new = await asyncio.to_thread(load_served, source, overrides=self.overrides)
            except ConfigError as exc:
                # `Gateway.reload` logs and counts what it loads itself; this load needed the overrides.
                gateway.count_refused(exc.located())
                log_refused(source, config_hash(gateway.config), exc.located())
                raise
            return await gateway.reload(new)
        finally:
            systemd.ready()

    async def _from_supervisor(self, link: _WorkerLink) -> None:
        spec = read_spec(link.spec_path)
        generation = spec["generation"]
        if generation != link.generation:
            receive_added(link.status_fd, link.provided)  # sent before the SIGHUP
            slots = self.gateway._slots
            self.gateway._slots = SlotMap.from_spec(spec["slots"])  # where the new config's limits live
            try:
                await self.gateway.reload(attach(load_config(spec["raw"]), spec.get("deployed")))
            except Exception as exc:
                self.gateway._slots = slots
                if not isinstance(exc, (ConfigError, ReloadRefused)):
                    log.exception("reload to generation %d failed", generation)
                errors = (exc.located() if isinstance(exc, ConfigError) else exc.problems
                          if isinstance(exc, ReloadRefused) else [f"{type(exc).__name__}: {exc}"])
                # the supervisor restarts this worker on it, or rolls back when no worker could
                link.report(f"F {generation} {json.dumps([e[:2000] for e in errors[:20]])}")
                return
            finally:
                link.provided.close_left()  # our copies; the supervisor keeps its own
            link.generation = generation
        link.report(f"K {generation}")

    async def via_supervisor(self) -> dict[str, Any]:
        """A worker's `POST /config/reload`: validate the file as the supervisor will,
        then signal the supervisor, which reloads every worker."""
        link = self.link
        assert link is not None  # set only on workers
        spec = read_spec(link.spec_path)
        if os.getppid() != spec["supervisor"]:
            raise LookupError("the supervisor is gone; this worker is draining")
        if spec["source"].startswith("<"):
            raise LookupError(f"the running config has no file to reload from ({spec['source']})")
        try:
            new = await asyncio.to_thread(load_served, spec["source"], overrides=spec["overrides"])
            # Compared in the worker form, the one this worker's own config was loaded from.
            form = attach(load_config(worker_raw(new, spec["ports"])), new.deployed)
            old = dataclasses.replace(self.gateway.config, workers=spec["workers"])
            # The supervisor also places the limits (it refuses only when its tables are full).
            problems = refusals(old, dataclasses.replace(form, workers=new.workers),
                                shared_tables=True, slot_map=True)
            if problems:
                raise ReloadRefused(problems)
        except (ConfigError, ReloadRefused) as exc:
            errors = exc.located() if isinstance(exc, ConfigError) else exc.problems
            self.gateway.count_refused(errors)  # counted where it was asked (this worker's /stats)
            log_refused(spec["source"], config_hash(self.gateway.config), errors)
            raise
        run_dir = os.path.dirname(link.spec_path)
        refused_before = (read_outcome(run_dir, REFUSED) or {}).get("count", 0)
        # Tell the supervisor this worker waits on the outcome (it restarts it last), then ask.
        link.report("A")
        os.kill(spec["supervisor"], signal.SIGHUP)
        # Answer with the outcome: every worker applied it (or restarts on it), or the
        # supervisor refused it (a listener it could not bind, a file changed since).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ADMIN_RELOAD_WAIT
        while loop.time() < deadline:
            await asyncio.sleep(0.02)
            applied = read_outcome(run_dir, APPLIED)
            if applied is not None and applied["generation"] > spec["generation"]:
                return {"status": "applied", "hash": applied["hash"], "workers": applied["applied"],
                        "restarting": applied["restarting"], "ms": applied["ms"]}
            refused = read_outcome(run_dir, REFUSED)
            if refused is not None and refused["count"] > refused_before:
                raise ReloadRefused(refused["last"]["errors"])
        return {"status": "accepted", "hash": config_hash(form), "supervisor": spec["supervisor"],
                "message": f"validated; not every worker answered in {_ADMIN_RELOAD_WAIT:.0f}s "
                           "(see /stats reloads and the supervisor's log)"}


def log_refused(source: str, running: str, errors: list[str]) -> None:
    log.error("reload of %s refused; the running config (%s) keeps serving:\n  %s",
              source, running, "\n  ".join(errors))


def _reopen_logs(gateway: Gateway) -> None:
    """SIGUSR1: the process log (when it is a file) and the access log (destination file)."""
    files = logs.reopen()
    access = gateway._access_log  # the current one: a reload may have replaced it
    if access is not None:
        files += access.reopen()
    log.info("SIGUSR1: reopened %d log file(s)", files)


async def _serve(config: Config, overrides: dict[str, Any], link: _WorkerLink | None,
                 shared_limits: tuple[str, int, str | None] | None, inherited: Any = None,
                 on_takeover: Any = None, on_handover: Any = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A worker (link) serves its supervisor's sockets under its locks; a single process
    # binds (or inherits) and locks its own.
    gateway = Gateway(config, reuse_port=link is not None, lock_ports=link is None,
                      shared_limits=shared_limits, ws_worker=_ws_worker_from_env(),
                      inherited=link.provided if link is not None else inherited)
    if link is not None:
        gateway._slots = SlotMap.from_spec(read_spec(link.spec_path)["slots"])
        # /metrics and /stats in any worker show every worker (`observability.aggregate`)
        gateway._metrics.share(os.path.dirname(link.spec_path), int(os.environ.get("EDGEPLANE_WORKER_INDEX", "0")),
                               int(os.environ.get("EDGEPLANE_WORKERS", "1")))
    # A successor that fails to start must leave the predecessor's lock files alone.
    gateway._handed_over = inherited is not None
    reloads = _Reloads(gateway, overrides, link)
    gateway._reload_via = reloads.via_supervisor if link is not None else reloads.from_file
    try:
        await gateway.start()
    except BaseException:
        if inherited is not None:
            inherited.abandon()  # the predecessor keeps serving
        raise
    if inherited is not None:
        try:
            inherited.confirm()  # we serve: the predecessor stops accepting and drains
        except TakeoverError:
            inherited.abandon()
            await gateway.stop(drain_timeout=1.0, handed_over=True)  # the sockets and locks stay its
            raise
        gateway._handed_over = False  # the lock files are ours now: removed at our exit
        if on_takeover is not None:
            on_takeover()  # the pidfile names us only now
        log.info("took over the listeners of pid %d", inherited.pid)
    handed_over: list[bool] = []

    def on_handed_over() -> None:
        handed_over.append(True)
        if on_handover is not None:
            on_handover()  # the successor names itself in the pidfile: ours must not remove it
        stop.set()

    handover = None
    if link is not None:  # SIGUSR2 from the supervisor: a successor serves; drain now
        link.provided.close_left()
        loop.add_signal_handler(signal.SIGUSR2, on_handed_over)
    else:  # a successor (`serve --takeover`, SIGUSR2) may take our listeners
        handover = HandoverServer(gateway.handover_listeners, on_handed_over)
        try:
            await handover.start()
        except OSError as exc:  # an unusable lock directory: serving matters more than upgrades
            log.warning("takeover unavailable (serve --takeover, SIGUSR2 will not find this "
                        "instance): %s", exc)
            handover = None
        loop.add_signal_handler(signal.SIGUSR2, _spawn_successor)
    loop.add_signal_handler(signal.SIGHUP, reloads.on_signal)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_logs, gateway)
    # Everything built at start-up (config, snapshot, modules) lives for the whole
    # process: move it out of the collector's generations so a collection only walks
    # objects made since. Per-request objects are freed by reference counting.
    gc.collect()
    gc.freeze()
    if link is not None:
        gateway._supervisor_refusals = os.path.join(os.path.dirname(link.spec_path), "refused.json")
        link.report("R")
        _exit_with_supervisor(loop, stop)
    else:
        addrs = ", ".join(fmt_address(h, p) for h, p in gateway.addresses)
        admin = f"; admin {fmt_address(*gateway.admin_address)}" if gateway.admin_address else ""
        parser = native.describe(gateway.config.parser)
        logs.announce(f"edgeplane ready: 1 worker on {addrs}{admin}; {parser}", gateway.config.log_format)
        systemd.ready()
        reloads.watch_task = loop.create_task(reloads.watch_store())
    await stop.wait()
    if link is None:
        systemd.stopping()
    for task in (reloads.task, reloads.watch_task):
        if task is not None:
            task.cancel()
    cfg = gateway.config  # the current one: a reload may have changed the drain settings
    delay = f"after {cfg.drain_delay:.1f}s not ready, " if cfg.drain_delay else ""
    if handover is not None:
        await handover.close()
    if handed_over:
        log.info("handed over to a successor; draining (up to %.1fs)", cfg.drain_timeout)
    else:
        log.info("draining (%sup to %.1fs)", delay, cfg.drain_timeout)
    await gateway.stop(handed_over=bool(handed_over))
    # Drained: a second stop signal (the process group, an impatient service manager)
    # must not kill the process while it exits, or its exit status says "killed".
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)


def _spawn_successor() -> None:
    """SIGUSR2 (nginx's binary upgrade): start `serve --takeover` with this process's
    command line; it takes the listeners, and this process drains once it serves."""
    proc = subprocess.Popen(successor_argv(), start_new_session=True)  # outlives us
    log.info("SIGUSR2: started a successor (pid %d) to take over the listeners", proc.pid)
    loop = asyncio.get_running_loop()

    def reap() -> None:  # no zombie when it fails (then we keep serving)
        code = proc.poll()
        if code is None:
            loop.call_later(1.0, reap)
        elif code != 0:
            log.error("the successor (pid %d) exited with %d before taking over; still serving",
                      proc.pid, code)

    loop.call_later(1.0, reap)


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


def run_single(config: Config, *, overrides: dict[str, Any] | None = None, takeover: bool = False,
               on_takeover: Any = None, on_handover: Any = None) -> int:
    """Serve `config` in this process until SIGTERM/SIGINT (see the module docstring).
    `takeover`: inherit the listeners of the instance that owns them (`runtime.takeover`)."""
    raise_nofile_limit()
    systemd.set_title("edgeplane: gateway")
    inherited = receive_listeners(*takeover_address(config)) if takeover else None
    uvloop.run(_serve(config, overrides or {}, None, None, inherited, on_takeover, on_handover))
    return 0


def takeover_address(config: Config) -> tuple[str, int]:
    """The address whose lock file names the instance to take over: the first listener."""
    first = config.listen[0] if config.listen else (config.tls.listen[0] if config.tls else None)
    if first is None or not first.port:
        raise TakeoverError("--takeover finds the running instance by the config's first listener, "
                            "which needs a fixed port (not 0)")
    return first.host, first.port


def worker_main() -> int:
    """Entry point of a worker process started by the supervisor."""
    ignore_quiet_signals()  # inherited ignored already; this is for a hand-started worker
    spec_path = os.environ[ENV_SPEC]
    spec = read_spec(spec_path)
    config = attach(load_config(spec["raw"]), spec.get("deployed"))
    logs.setup_logging(config.log_level, os.environ.get(logs.ENV_LOG_FILE), config.log_format)
    index = int(os.environ.get("EDGEPLANE_WORKER_INDEX", "0"))
    systemd.set_title(f"edgeplane: worker {index + 1}/{os.environ.get('EDGEPLANE_WORKERS', '?')}")
    link = _WorkerLink(spec_path, int(os.environ[ENV_STATUS]), spec["generation"], provided_from_env())
    shared = os.environ.get(ENV_SHARED)
    keys = os.environ.get(ENV_SHARED_KEYS)
    try:
        uvloop.run(_serve(config, {}, link, (shared, index, keys) if shared else None))
        return 0
    except OSError as exc:  # a bind error names its listener: one line, not a traceback
        print(f"edgeplane worker {index} (pid {os.getpid()}): cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
