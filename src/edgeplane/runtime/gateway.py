"""The embedding API: a `Gateway` runs one worker's listeners inside a running event loop.

Owns the lifecycle of one worker: build upstream pools and the snapshot from a `Config`,
bind the data and admin listeners, run the housekeeping tick (Date header, access-log
flush, pool sweeps), and stop with a drain. The CLI's `serve` and each process of
`workers: N` are thin layers over this class, so tests drive exactly what users run.

    gw = Gateway("conf/edgeplane.yaml")      # or a dict, or a model.Config
    await gw.start()
    print(gw.addresses, gw.admin_address)
    await gw.stop()

Plugins: every registered policy's `start`/`stop` run with the gateway (JWKS sources,
custom-authorizer clients), its compile step with each snapshot, its `stats` in /stats.

WebSocket APIs (`websocket_apis`): the gateway owns this worker's `ConnectionRegistry`
and passes the compiled APIs into the snapshot. Under a supervisor (`ws_worker`, set by
`runtime.workers`) each worker also serves the admin app on its own Unix socket,
`<dir>/worker-<index>.sock`, in the private directory the supervisor created; the
workers of one supervisor share its host tag, so a connection id names its worker and
host, and the per-API new-connection buckets live in the supervisor's shared limit table
(at the slots of the supervisor's `slots.SlotMap`). With `cluster:` the registry also listens on Redis pub/sub.

Listeners: each is bound exclusively and, unless `lock_ports=False` (the workers of a
supervisor, which holds the locks), owned through its lock file (`runtime.ports`): a
fixed port is locked before the bind, port 0 on the chosen port right after. A failure
raises a `ListenerError` naming the listener kind (data, TLS, admin) and its address.
Running out of file descriptors is logged (at most once a second) whether asyncio's loop
reports it on accept or the tick's probe finds the descriptor table full (uvloop).

Invariants: `start()` either binds everything or raises with nothing left bound or locked;
`stop()` is idempotent and leaves no listeners, connections or tasks behind; WebSockets
are closed with 1001 and their $disconnect calls run before the upstream pools close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from edgeplane.config.loader import ConfigError
from edgeplane.config.model import Config
from edgeplane.deploy.served import describe, load_served
from edgeplane.http.context import ServerContext
from edgeplane.http.protocol import HttpProtocol
from edgeplane.http.responses import DateHeader
from edgeplane.http.tls import ListenerTls
from edgeplane.observability.collect import VERSION, WorkerMetrics
from edgeplane.observability.metrics import DENIED
from edgeplane.observability.otlp import tracer_for
from edgeplane.observability.tracing import Tracer
from edgeplane.plugins.base import RuntimeContext
from edgeplane.policies.quota.store import QuotaPeriod, QuotaStore
from edgeplane.policies.throttle.shared_keys import SharedKeyTable
from edgeplane.policies.throttle.shared_limits import SharedLimitTable
from edgeplane.policies.throttle.slots import SlotMap
from edgeplane.policies.throttle.stores import limits_for, plans_of
from edgeplane.routing.snapshot import Snapshot, build_snapshot
from edgeplane.runtime.accesslog import AccessLog
from edgeplane.runtime.admin import admin_listener_tls, build_admin_snapshot
from edgeplane.runtime.gateway_ws import GatewayWebSockets
from edgeplane.runtime.ports import DescriptorAlarm, ListenerLock, bind_error, fmt_address, lock_listener
from edgeplane.runtime.reload import ReloadRefused, apply, config_hash, reload_source
from edgeplane.upstream.cluster import Upstream, resolve_all
from edgeplane.websocket.connections import ConnectionRegistry

if TYPE_CHECKING:
    from edgeplane.policies.throttle.cluster import RedisLimiter, RedisQuotaStore
    from edgeplane.websocket.bus import RedisBus

ENV_STRICT = "EDGEPLANE_STRICT"

log = logging.getLogger("edgeplane")


class Gateway(GatewayWebSockets):
    """One worker's gateway: listeners, upstream pools, the compiled snapshot, plugins.

    Build it from a config file path, a dict or a loaded `Config`; `plugins` adds policy
    or integration objects beside the installed ones (only with a path or a dict: a
    `Config` carries the registry it was loaded with). Then `await start()` binds every
    listener (or raises with nothing bound) and `await stop()` drains: in-flight requests
    get up to `drain_timeout` (the config's unless given), WebSockets close with 1001.
    `async with Gateway(...) as gw:` does both, honouring the configured drain timeout.

    Public surface: `config`, `addresses` (HTTP listeners), `tls_addresses`,
    `admin_address`, `url(path)`, `stats()`, `upstream_telemetry()`, `draining`, `ready`,
    `start()`, `stop()`. Everything else is internal (underscored). The keywords
    `reuse_port`, `lock_ports`, `shared_limits` and `ws_worker` are set by the supervisor
    of `workers: N` (`runtime.workers`), not by embedders.
    """

    def __init__(self, config: Config | dict[str, Any] | str | os.PathLike[str], *,
                 plugins: Sequence[Any] = (), reuse_port: bool = False, lock_ports: bool = True,
                 shared_limits: tuple[str, int] | tuple[str, int, str | None] | None = None,
                 ws_worker: tuple[int, str, bytes] | None = None, inherited: Any = None,
                 access_log_callback: Callable[[list[dict[str, Any]]], None] | None = None,
                 strict: bool | None = None) -> None:
        if isinstance(config, Config):
            if plugins:
                raise ValueError("plugins= needs a config path or dict (a Config carries its registry)")
            self.config = config
        else:
            self.config = load_served(config, plugins=plugins)
        self._plugins = plugins  # a reload loads its config with the same extra plugins
        # `serve --strict` (its workers inherit the variable): an upstream name that does
        # not resolve at start is fatal instead of a warning
        self.strict = strict if strict is not None else os.environ.get(ENV_STRICT) == "1"
        # An embedder's access-log callback: the records (dicts, the default shape) of each
        # flush, on the event loop (`AccessLog.flush`); with or without a destination.
        self.access_log_callback = access_log_callback
        # `serve --takeover`: the predecessor's listening sockets (`takeover.Inherited`),
        # used instead of binding; once this gateway hands its own over, its locks stay.
        self._inherited = inherited
        self._handed_over = False
        self._reuse_port = reuse_port
        self._lock_ports = lock_ports
        self._listener_locks: list[ListenerLock] = []
        self._fd_alarm = DescriptorAlarm()
        # (table name, worker index[, keyed table name]) of the supervisor's cross-worker
        # throttle tables (shared_limits, shared_keys).
        self._shared_limits = shared_limits
        self._metrics = WorkerMetrics()  # /metrics (`observability`)
        self._tracer: Tracer | None = None  # with `tracing`: the tracer and its OTLP exporter
        self._config_hash = ""
        # Where each shared limit lives: the supervisor's map (`slots.SlotMap`, set by
        # `runtime.serving` from the workers' spec) or, when None, the config's initial one.
        self._slots: SlotMap | None = None
        self._shared_table: SharedLimitTable | None = None
        self._keyed_table: SharedKeyTable | None = None
        self._quota_store: QuotaStore | RedisQuotaStore | None = None
        self._limiter: RedisLimiter | None = None  # cluster mode: the Redis side of throttles
        self._quota_flush: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._upstreams: dict[str, Upstream] = {}
        self._runtime: RuntimeContext | None = None  # the plugins' per-gateway state
        self._snapshot: Snapshot | None = None
        self._context: ServerContext | None = None
        self._admin_context: ServerContext | None = None
        self._access_log: AccessLog | None = None
        self._date = DateHeader()
        self.addresses: list[tuple[str, int]] = []
        self.tls_addresses: list[tuple[str, int]] = []  # the `tls.listen` listeners
        self._tls: ListenerTls | None = None
        self.admin_address: tuple[str, int] | None = None
        self._draining = False
        self._ready = False  # /ready: from the end of start() until stop() begins
        # reload_from_source's way when `runtime.serving` sets it (CLI overrides, the supervisor)
        self._reload_via: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._servers: list[asyncio.AbstractServer] = []
        # (kind, host, port as configured) -> (servers, their lock): what a reload re-binds.
        # One server per socket; more than one only for sockets received from a
        # supervisor's worker slots (a takeover), all served.
        self._bound: dict[tuple[str, str, int], tuple[list[asyncio.Server], ListenerLock | None]] = {}
        self._limits: Any = None  # the throttle stores of the current snapshot (a reload's `previous`)
        self._retiring: set[asyncio.Task[None]] = set()  # what replaced configs still close
        self._reloads: dict[str, Any] = {"ok": 0, "failed": 0, "last": None}
        self._supervisor_refusals: str | None = None  # set by a supervisor's worker (serving.py)
        self._tick: asyncio.TimerHandle | None = None
        self._started = False
        self._stopped = False
        # WebSocket APIs: (worker index, socket directory, host tag) under a supervisor.
        self._ws_worker = ws_worker
        self._ws_registry: ConnectionRegistry | None = None
        self._ws_socket: str | None = None  # this worker's admin Unix socket
        self._ws_bus: RedisBus | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        self._access_log = AccessLog(cfg.access_log, self.access_log_callback)
        self._upstreams = {name: Upstream(u, loop) for name, u in cfg.upstreams.items()}
        await resolve_all(list(self._upstreams.values()), self.strict)  # hostname targets (`upstream.dns`)
        # What the plugins open per gateway (JWKS sources, custom-authorizer clients).
        runtime = self._runtime = RuntimeContext(loop, cfg, self._upstreams)
        for policy in cfg.registry.policies():
            await policy.start(runtime)
        if self._shared_limits is not None and cfg.cluster is None:
            name, index, *keys = self._shared_limits
            self._shared_table = SharedLimitTable.attach(name, index)
            if keys and keys[0]:
                self._keyed_table = SharedKeyTable.attach(keys[0], index)
        if cfg.cluster is not None:
            # redis-py: only here
            from edgeplane.policies.throttle.cluster import REDIS_ERRORS, RedisLimiter, RedisQuotaStore

            self._limiter = RedisLimiter(cfg.cluster, loop)
        periods = [QuotaPeriod(p.quota_period, p.quota_offset)
                   for p in plans_of(cfg).values() if p.quota_limit]
        if periods and self._limiter is not None:
            cluster = self._limiter.config  # `cfg.cluster`: the limiter exists only with it
            self._quota_store = RedisQuotaStore(self._limiter, periods)
            try:
                await asyncio.wait_for(self._quota_store.aload(), max(1.0, cluster.timeout * 10))
            except REDIS_ERRORS as exc:
                log.warning("quota counts not loaded from redis %s (%s): counting from the next "
                            "successful flush", cluster.redis, exc.__class__.__name__)
        elif periods:
            # Quota counts survive restarts: loaded now, flushed off the request path on
            # the tick and at stop (crash bound: what was admitted since the last flush).
            self._quota_store = QuotaStore(os.path.join(cfg.data_dir, "edgeplane.db"))
            self._quota_store.load(periods=periods)
        counter = self._quota_store.counter if self._quota_store is not None else None
        limits = self._limits = limits_for(cfg, self._shared_table, self._keyed_table, self._limiter,
                                           slots=self._slots)
        self._snapshot = build_snapshot(cfg, self._upstreams, runtime.state, limits, counter,
                                       authorizer_outcomes=self._metrics.authorizers,
                                       websockets_for=self._websockets_for(cfg, loop, self._upstreams, runtime))
        self._metrics.attach(self._snapshot)
        self._config_hash = config_hash(cfg)
        self._context = ServerContext(loop, self._snapshot, cfg.limits, cfg.parser,
                                     self._access_log, self._date, metrics=self._metrics.requests)
        self._context.tracer = self._tracer = tracer_for(cfg.tracing, loop, VERSION)
        admin_log = AccessLog(type(cfg.access_log)(destination="off"))
        self._admin_context = ServerContext(loop, build_admin_snapshot(self, cfg.admin), cfg.limits,
                                           "httptools", admin_log, self._date, name="admin")
        try:
            self._fd_alarm.install(loop)
            for addr in cfg.listen:
                server = await self._bind(self._context, addr.host, addr.port)
                self.addresses.append(server.sockets[0].getsockname()[:2])
            if cfg.tls is not None:
                self._tls = ListenerTls.from_config(cfg.tls)
                for addr in cfg.tls.listen:
                    server = await self._bind(self._context, addr.host, addr.port, tls=self._tls)
                    self.tls_addresses.append(server.sockets[0].getsockname()[:2])
            if cfg.admin.listen is not None:
                a = cfg.admin.listen
                server = await self._bind(self._admin_context, a.host, a.port,
                                          tls=admin_listener_tls(cfg.admin))
                self.admin_address = server.sockets[0].getsockname()[:2]
            await self._start_ws_forwarding(cfg)
        except BaseException:
            await self._close_servers()
            await self._stop_ws_forwarding()
            raise
        self._schedule_tick()
        self._ready = True
        urls = [f"http://{h}:{p}" for h, p in self.addresses]
        urls += [f"https://{h}:{p}" for h, p in self.tls_addresses]
        admin_scheme = "https" if cfg.admin.tls is not None else "http"
        log.info("listening on %s%s", ", ".join(urls),
                 f"; admin on {admin_scheme}://{self.admin_address[0]}:{self.admin_address[1]}"
                 if self.admin_address else "")
        if cfg.stages is not None:
            log.info("stages: %s", describe(cfg))

    async def _bind(self, ctx: ServerContext, host: str, port: int,
                    tls: ListenerTls | None = None) -> asyncio.Server:
        if tls is None:
            factory = lambda: HttpProtocol(ctx)  # noqa: E731
            extra: dict[str, Any] = {}
        else:
            factory = lambda: HttpProtocol(ctx, True)  # noqa: E731
            extra = {"ssl": tls.default, "ssl_handshake_timeout": ctx.limits.head_timeout}
        kind = "admin" if ctx is self._admin_context else "TLS" if tls is not None else "data"
        loop = cast(asyncio.AbstractEventLoop, self._loop)  # set: start() binds
        taken = self._inherited.take(kind, host, port) if self._inherited is not None else None
        if taken is not None:  # a takeover, or a worker: sockets that are already listening
            socks, lock = taken
            if lock is not None:
                self._listener_locks.append(lock)
            servers = []
            for sock in socks:
                # Listen ourselves: a slot the supervisor paused resumes here (uvloop does
                # not call listen() again on a socket it is given); on one that listens it
                # only sets the backlog.
                sock.listen(4096)
                servers.append(await loop.create_server(factory, sock=sock, backlog=4096, **extra))
                self._servers.append(servers[-1])  # from here on, start()'s cleanup closes it
            self._bound[(kind, host, port)] = (servers, lock)
            bound = servers[0].sockets[0].getsockname()[:2]
            self._fd_alarm.listeners[bound] = f"{kind} listener {fmt_address(*bound)}"
            return servers[0]
        lock = lock_listener(kind, host, port) if self._lock_ports and port else None
        try:
            server = await loop.create_server(
                factory, host, port, reuse_port=self._reuse_port or None,
                backlog=4096, family=socket.AF_INET6 if ":" in host else socket.AF_INET, **extra,
            )
        except OSError as exc:
            if lock is not None:
                lock.release()
            raise bind_error(kind, host, port, exc) from exc
        self._servers.append(server)  # from here on, start()'s cleanup closes it
        bound = server.sockets[0].getsockname()[:2]
        if self._lock_ports and not port:
            lock = lock_listener(kind, host, bound[1])
        if lock is not None:
            self._listener_locks.append(lock)
        self._bound[(kind, host, port)] = ([server], lock)
        self._fd_alarm.listeners[bound] = f"{kind} listener {fmt_address(*bound)}"
        return server

    def _schedule_tick(self) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)  # set: start() or its tick schedules
        self._tick = loop.call_later(min(self.config.access_log.flush_interval, 1.0), self._on_tick)

    def _on_tick(self) -> None:
        # start() set what the tick reads; stop() cancels it before clearing the snapshot
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        self._date.refresh()
        self._fd_alarm.probe()  # uvloop drops connections on EMFILE without telling anyone
        cast(AccessLog, self._access_log).flush()
        self._metrics.flush(self)  # with workers: this worker's counts, for /metrics in any worker
        now = loop.time()
        for upstream in self._upstreams.values():
            upstream.sweep(now)
        store = self._quota_store
        if store is not None and (self._quota_flush is None or self._quota_flush.done()):
            self._quota_flush = loop.create_task(self._flush_quotas())
        mono = time.monotonic()  # the throttle's clock
        for route in cast(Snapshot, self._snapshot).routes:
            for stage in route.stages:
                sweep = getattr(stage, "sweep", None)
                if sweep is not None:
                    sweep(mono)  # idle per-client buckets (bounded work per tick)
        self._schedule_tick()

    async def _flush_quotas(self) -> None:
        try:
            await cast("QuotaStore | RedisQuotaStore", self._quota_store).aflush()  # set: the tick checked
        except Exception as exc:  # the deltas stay in memory for the next flush
            log.warning("quota flush failed: %s", exc)

    async def stop(self, drain_timeout: float | None = None, drain_delay: float | None = None, *,
                   handed_over: bool = False) -> None:
        """Report not-ready (/ready and /healthz 503) but keep serving for `drain_delay`,
        then stop accepting, let in-flight requests finish (up to the drain timeout), give
        idle keep-alive connections `DRAIN_IDLE_GRACE` for one more request (answered with
        `Connection: close`), and close everything (both: the config's unless given). The
        admin listener closes last, so a load balancer can follow the drain. `handed_over`
        (a successor answers on the same sockets): no delay, and proxied WebSockets stay
        until they close or the drain timeout nears (`_outlive_handover`)."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._draining, self._ready, self._handed_over = True, False, handed_over
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        delay = 0.0 if handed_over else self.config.drain_delay if drain_delay is None else drain_delay
        if delay > 0:
            log.info("not ready; serving %.1fs more before draining (drain_delay)", delay)
            await asyncio.sleep(delay)
        for (kind, _, _), (servers, _) in self._bound.items():
            if kind != "admin" or handed_over:
                for server in servers:
                    server.close()
        loop = cast(asyncio.AbstractEventLoop, self._loop)  # set: started
        ctx, admin = self._context, self._admin_context  # None when start() failed early
        if ctx is not None:
            ctx.draining = True  # every response from now on says `Connection: close`
            for proto in list(ctx.connections):
                if proto.idle():
                    proto.drain_idle()  # a request already on its way is still answered
        if handed_over and ctx is not None:
            # Keep what is open for the drain timeout, less the time to close it cleanly.
            await self._outlive_handover(ctx, max(0.0, timeout - 2.5))
        await self._close_websockets(min(timeout, 2.5))
        deadline = loop.time() + timeout
        # In-flight admin calls finish too (a reload call may be waiting for its outcome).
        while loop.time() < deadline and ((ctx is not None and ctx.connections) or (
                admin is not None and any(not proto.idle() for proto in admin.connections))):
            await asyncio.sleep(0.02)
        for c in (ctx, admin):  # the admin last: health and readiness stayed visible until now
            if c is not None:  # the reason a request cut now is logged with:
                c.draining, c.stop_reason = True, "gateway stopped: drain timeout"
                for proto in list(c.connections):
                    proto.transport.abort()
        # Handshakes that completed during the drain (their 101 came after the first pass).
        await self._close_websockets(0.5)
        await self._close_servers()
        if self._ws_registry is not None:  # $disconnect calls still running need the pools
            await self._ws_registry.drain(min(max(timeout, 0.5), 5.0))
        await self._stop_ws_forwarding()
        for task in list(self._retiring):  # replaced configs: their runtimes stop now
            task.cancel()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for upstream in self._upstreams.values():
            await upstream.close()
        if self._runtime is not None:
            for policy in self.config.registry.policies():
                await policy.stop(self._runtime)
        if self._quota_flush is not None:
            await asyncio.gather(self._quota_flush, return_exceptions=True)
        store = self._quota_store
        if store is not None and hasattr(store, "aclose"):  # RedisQuotaStore
            await store.aclose()
        elif store is not None:
            store.close(flush=True)
        if self._limiter is not None:
            await self._limiter.close()
        if self._shared_table is not None:
            self._snapshot = None  # the stages hold views into the tables
            self._shared_table.close()
        if self._keyed_table is not None:
            self._keyed_table.close()
        if self._tick is not None:
            self._tick.cancel()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        if self._tracer is not None:  # the spans of the last requests, bounded by the export timeout
            await self._tracer.exporter.close()
        if self._access_log is not None:  # None when start() failed opening it
            self._access_log.close()
        log.info("stopped")

    # ------------------------------------------------------------------ reload
    async def reload(self, config: Config | dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """Apply a new config live (`runtime.reload`): validated whole first; a refused
        or invalid one changes nothing and raises (`ConfigError` with every problem by
        location, or `ReloadRefused` naming what cannot change live). Returns what the
        reload did; every attempt is logged and counted (`stats()["reloads"]`)."""
        if not self._started or self._stopped:
            raise RuntimeError("reload needs a running gateway")
        started = time.perf_counter()
        try:
            # (off the loop: the deployment store may be a Redis that is slow to answer)
            new = config if isinstance(config, Config) else await asyncio.to_thread(
                load_served, config, plugins=self._plugins)
            report = await apply(self, new)
        except (ConfigError, ReloadRefused) as exc:
            problems = exc.located() if isinstance(exc, ConfigError) else exc.problems
            self.count_refused(problems)
            log.error("reload of %s refused; the running config (%s) keeps serving:\n  %s",
                      getattr(config, "source", config) if not isinstance(config, dict) else "<dict>",
                      config_hash(self.config), "\n  ".join(problems))
            raise
        except Exception as exc:  # a bind error, a plugin's start: nothing was swapped in
            self.count_refused([f"{type(exc).__name__}: {exc}"])
            log.error("reload failed; the running config (%s) keeps serving: %s", config_hash(self.config), exc,
                      exc_info=not isinstance(exc, OSError))
            raise
        self._reloads["ok"] += 1
        self._reloads["last"] = {"ok": True, "at": time.time(), **report}
        log.info("reloaded config %s in %.1f ms: %d routes; upstreams kept %s, new %s, retired %s",
                 report["hash"], (time.perf_counter() - started) * 1000, report["routes"],
                 report["upstreams_kept"] or "-", report["upstreams_new"] or "-",
                 report["upstreams_retired"] or "-")
        if new.stages is not None:
            log.info("stages: %s", describe(new))
        return report

    def count_refused(self, errors: list[str]) -> None:
        """Count a reload that changed nothing (`stats()["reloads"]`), with its errors."""
        self._reloads["failed"] += 1
        self._reloads["last"] = {"ok": False, "errors": errors, "at": time.time()}

    def _reload_stats(self) -> dict[str, Any]:
        out = dict(self._reloads)
        if self._supervisor_refusals:  # a worker: what its supervisor refused (never applied here)
            try:
                with open(self._supervisor_refusals) as fh:
                    out["refused_by_supervisor"] = json.load(fh)
            except (OSError, ValueError):
                pass  # none yet
        return out

    def _refresh_admin(self, new: Config) -> None:
        """The admin app on the new config (a changed token or public paths)."""
        ctx = cast(ServerContext, self._admin_context)
        ctx.snapshot = build_admin_snapshot(self, new.admin)
        ctx.limits = new.limits

    async def reload_from_source(self) -> dict[str, Any]:
        """Reload from the file the running config came from (SIGHUP, the admin call).
        LookupError when it came from a dict or a Config (nothing to read again)."""
        if self._reload_via is not None:
            return await self._reload_via()
        return await self.reload(reload_source(self.config.source))

    async def _rebind(self, new: Config) -> None:
        """Bind the data and TLS listeners `new` adds, close the ones it drops. A bind
        failure closes what this call bound and raises: the old set stays."""
        wanted = {("data", a.host, a.port) for a in new.listen}
        if new.tls is not None:
            wanted |= {("TLS", a.host, a.port) for a in new.tls.listen}
        have = {key for key in self._bound if key[0] != "admin"}
        # A listener configured with port 0 is the same one as the port it got.
        for kind, host, port in list(have):
            server = self._bound[(kind, host, port)][0][0]
            actual = server.sockets[0].getsockname()[1] if server.sockets else port
            if port == 0 and (kind, host, actual) in wanted:
                self._bound[(kind, host, actual)] = self._bound.pop((kind, host, port))
                have.discard((kind, host, port))
                have.add((kind, host, actual))
        added: list[tuple[str, str, int]] = []
        try:
            for kind, host, port in sorted(wanted - have):
                ctx = cast(ServerContext, self._context)
                server = await self._bind(ctx, host, port, tls=self._tls if kind == "TLS" else None)
                (self.tls_addresses if kind == "TLS" else self.addresses).append(server.sockets[0].getsockname()[:2])
                added.append((kind, host, port))
        except BaseException:
            for key in added:
                self._unbind(key)
            raise
        for key in sorted(have - wanted):
            self._unbind(key)

    def _unbind(self, key: tuple[str, str, int]) -> None:
        entry = self._bound.pop(key, None)
        if entry is None:
            return
        servers, lock = entry
        address = servers[0].sockets[0].getsockname()[:2] if servers[0].sockets else None
        for server in servers:
            server.close()  # open connections stay and finish; no new ones
            if server in self._servers:
                self._servers.remove(server)
        for listing in (self.addresses, self.tls_addresses):
            if address in listing:
                listing.remove(address)
        if lock is not None:
            lock.release()
            if lock in self._listener_locks:
                self._listener_locks.remove(lock)

    def handover_listeners(self) -> list[tuple[str, str, int, list[Any], ListenerLock | None]]:
        """Every listener as (kind, host, configured port, sockets, lock), for a
        successor (`runtime.takeover`). Once it serves, `stop()` with `handed_over`
        keeps the lock files (the successor holds them now)."""
        return [(kind, host, port, [server.sockets[0] for server in servers], lock)
                for (kind, host, port), (servers, lock) in self._bound.items()]

    def _retire(self, closing: Any) -> None:
        task = cast(asyncio.AbstractEventLoop, self._loop).create_task(closing)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except TimeoutError:
                pass
        self._servers.clear()
        for lock in self._listener_locks:  # after the close: never unlocked while bound
            if self._handed_over:
                lock.detach()  # the successor holds it now: keep the file
            else:
                lock.release()
        self._listener_locks.clear()
        self._fd_alarm.uninstall()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()  # drains for the configured drain_timeout

    # ------------------------------------------------------------------ helpers
    @property
    def draining(self) -> bool:
        """True from the moment `stop()` begins."""
        return self._draining

    @property
    def ready(self) -> bool:
        """True once `start()` bound every listener, until `stop()` begins (/ready)."""
        return self._ready

    def upstream_telemetry(self) -> list[dict[str, Any]]:
        """Per upstream and target: pool counters and per-connection telemetry (what the
        admin API's /upstreams answers)."""
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        return [u.telemetry(now) for u in self._upstreams.values()]

    def url(self, path: str = "/") -> str:
        if not self.addresses:
            host, port = self.tls_addresses[0]
            return f"https://{host}:{port}{path}"
        host, port = self.addresses[0]
        return f"http://{host}:{port}{path}"

    def stats(self) -> dict[str, Any]:
        ctx = cast(ServerContext, self._context)  # stats are asked of a started gateway
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "config_hash": self._config_hash,  # as the reload log lines and edgeplane_config_info show it
            "connections_open": len(ctx.connections),
            "websockets_open": len(ctx.websockets),  # proxied and terminated
            "access_log_lines": cast(AccessLog, self._access_log).written,
            "access_log_dropped": cast(AccessLog, self._access_log).dropped,
            **({"tracing": self._tracer.exporter.telemetry()} if self._tracer is not None else {}),
            **ctx.stats.as_dict(),
            "authorizers": {},
            "reloads": self._reload_stats(),
            **({"cluster": self._limiter.telemetry()} if self._limiter is not None else {}),
            **({"websockets": self._ws_registry.telemetry()}
               if self._ws_registry is not None and self._ws_registry.apis else {}),
        }
        # authorizer refusals (401/403) by authorizer: the `denied` decisions of /metrics
        denied = {name: counts[DENIED] for name, counts in self._metrics.authorizers.by_name.items() if counts[DENIED]}
        if denied:
            out["refused"]["authorizer"] = denied
        if self._runtime is not None:
            for policy in self.config.registry.policies():
                for section, values in (policy.stats(self._runtime) or {}).items():
                    merged = out.setdefault(section, {})
                    if isinstance(merged, dict) and isinstance(values, dict):
                        merged.update(values)
                    else:
                        out[section] = values
        return out
