"""Hot reload: a validated `Config` replaces the running one in one worker, atomically.

Owns `apply(gateway, config)`, which `Gateway.reload` calls, and `refusals(old, new)`,
the changes that cannot be made live. The new snapshot is compiled beside the old one;
nothing the data path reads changes until one assignment (`ServerContext.snapshot`)
swaps it, so a request in flight finishes on the snapshot it started with and the next
one, even on a kept-alive connection, routes on the new.

What carries over (an unchanged thing is the same object, with its state):
- upstreams whose settings are unchanged keep their pools and idle connections; a
  removed or changed one drains: its busy connections finish, then close;
- throttle buckets of unchanged limits keep their tokens (in process; shared-memory and
  Redis buckets live outside it: with `workers: N` the supervisor's slot map,
  `slots.SlotMap`, keeps an unchanged limit at its slot and gives a changed one a fresh
  slot); usage-plan quota counts are the same store;
- WebSocket connections stay on the API they opened with; the @connections registry is
  the same one, so management calls still find them;
- the plugins' runtime (JWKS sources, custom-authorizer clients) starts anew on the new
  config, so key files are read again; the old runtime stops after a grace period, once
  requests that used it are done;
- listeners: added ones are bound, removed ones closed; TLS certificates are swapped
  for new handshakes; limits, the parser and the access log apply to the next request.

Invariants: `refusals` is checked first and a refused reload changes nothing; on an
error while building, everything built for the new config is closed and the old one
keeps serving; nothing is half-applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from edgeplane.config.stages import serves_websockets
from edgeplane.http.context import connection_cap
from edgeplane.http.tls import ListenerTls
from edgeplane.observability.collect import VERSION
from edgeplane.observability.otlp import tracer_for
from edgeplane.plugins.base import RuntimeContext
from edgeplane.policies.throttle.slots import identities
from edgeplane.policies.throttle.stores import limits_for, plans_of
from edgeplane.routing.snapshot import build_snapshot
from edgeplane.runtime.accesslog import AccessLog
from edgeplane.upstream.cluster import Upstream

if TYPE_CHECKING:
    from edgeplane.config.model import Config

log = logging.getLogger("edgeplane.reload")

# How long a replaced plugin runtime and drained upstreams may still serve requests
# that started before the swap (bounded by the drain timeout).
_GRACE_MAX = 30.0


class ReloadRefused(Exception):
    """The new config cannot be applied live; `problems` say what and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def reload_source(source: str) -> str:
    """The file a running config is reloaded from, or LookupError when it came from a
    dict, a `Config` or stdin, or the file is gone."""
    if not source or source.startswith("<") or not os.path.exists(source):
        raise LookupError(f"the running config has no file to reload from ({source})")
    return source


def config_hash(config: Config) -> str:
    """A short, stable digest of the config as written (logged and counted per reload)."""
    served = config.deployed  # each stage's deployment is part of what is served
    written = config.raw if not served else {**config.raw, "(deployed)": [served["stages"], sorted(served["apis"])]}
    raw = orjson.dumps(written, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(raw).hexdigest()[:12]


def _quota_periods(config: Config) -> set[tuple[Any, Any]]:
    return {(p.quota_period, p.quota_offset) for p in plans_of(config).values() if p.quota_limit}


def refusals(old: Config, new: Config, *, shared_tables: bool, slot_map: bool = False) -> list[str]:
    """What `new` changes that a running worker cannot: each names the key and the way
    to apply it (a restart, or `serve --takeover` with no downtime). `shared_tables`:
    the limits live in shared memory; `slot_map`: a supervisor places them there
    (`slots.SlotMap`, which refuses only when its tables are full), else their set is
    fixed for the life of the tables."""
    out = []
    how = "restart, or `edgeplane serve --takeover`"
    if new.workers != old.workers:
        out.append(f"workers: {old.workers} -> {new.workers} cannot change on reload ({how})")
    if new.admin.listen != old.admin.listen or new.admin.tls != old.admin.tls:
        out.append(f"admin.listen / admin.tls cannot change on reload ({how})")
    if new.cluster != old.cluster:
        out.append(f"cluster: the Redis settings cannot change on reload ({how})")
    if new.data_dir != old.data_dir or _quota_periods(new) != _quota_periods(old):
        out.append(f"usage_plans quota periods / data_dir cannot change on reload ({how}): "
                   "the quota counts are kept per period")
    if (new.tls is None) != (old.tls is None):
        out.append(f"tls: TLS listeners cannot be switched on or off on reload ({how})")
    if shared_tables and not slot_map and identities(new) != identities(old):
        out.append("throttle: these shared-memory tables have no supervisor to place new limits; "
                   f"adding, removing or changing a throttle needs a {how}")
    if shared_tables and serves_websockets(new) != serves_websockets(old):
        out.append(f"websocket_apis: adding the first or removing the last API with workers > 1 ({how})")
    return out


async def apply(gw: Any, new: Config) -> dict[str, Any]:
    """Swap `new` into `gw` (a started `runtime.gateway.Gateway`; see the module
    docstring); returns what the reload did."""
    old = gw.config
    started = time.perf_counter()
    problems = refusals(old, new, shared_tables=gw._shared_table is not None, slot_map=gw._slots is not None)
    if problems:
        raise ReloadRefused(problems)
    loop = asyncio.get_running_loop()
    # An upstream whose pools would be the same is kept (connections and counts); a change
    # of its targets' weights only is applied at the swap (`Upstream.reweight`).
    kept = {name: u for name, u in gw._upstreams.items()
            if name in new.upstreams and u.cfg.pools_key() == new.upstreams[name].pools_key()}
    upstreams = {name: kept.get(name) or Upstream(u, loop) for name, u in new.upstreams.items()}
    fresh = [u for name, u in upstreams.items() if name not in kept]
    runtime = RuntimeContext(loop, new, upstreams, previous=gw._runtime)
    started_policies = []
    try:
        for u in fresh:  # their hostname targets (a name that does not resolve: logged, 503 until it does)
            await u.resolve()
        for policy in new.registry.policies():
            await policy.start(runtime)
            started_policies.append(policy)
        limits = limits_for(new, gw._shared_table, gw._keyed_table, gw._limiter, previous=gw._limits,
                            slots=gw._slots)
        counter = gw._quota_store.counter if gw._quota_store is not None else None
        snapshot = build_snapshot(new, upstreams, runtime.state, limits, counter,
                                  websockets_for=gw._websockets_for(new, loop, upstreams, runtime),
                                  authorizer_outcomes=gw._metrics.authorizers)
        gw._metrics.attach(snapshot)
        tls = ListenerTls.from_config(new.tls) if new.tls is not None else None
        access_log = (AccessLog(new.access_log, gw.access_log_callback, previous=gw._access_log)
                      if new.access_log != old.access_log else None)
        await gw._rebind(new)  # listeners last: it is the only step visible from outside
    except BaseException:
        runtime.give_back()  # what was moved from the running config goes back to it, open
        runtime.previous = None
        for policy in started_policies:
            await policy.stop(runtime)
        for u in fresh:
            await u.close()
        raise
    # ---- the swap: from here on nothing can fail half-way
    runtime.previous = None  # the old runtime is not kept alive by the new one
    retired_upstreams = [u for name, u in gw._upstreams.items() if upstreams.get(name) is not u]
    retired_runtime = gw._runtime
    retired_log = None
    ctx = gw._context
    assert ctx is not None and gw._admin_context is not None  # a started gateway
    ctx.snapshot = snapshot
    ctx.limits = new.limits
    ctx.parser_kind = new.parser
    ctx.max_connections = connection_cap(new.limits, snapshot)
    if access_log is not None:
        retired_log, ctx.access_log, gw._access_log = ctx.access_log, access_log, access_log
    tracer = tracer_for(new.tracing, loop, VERSION, gw._tracer) if new.tracing != old.tracing else gw._tracer
    if tracer is not gw._tracer:  # tracing changed: the old exporter sends what it holds, then stops
        if gw._tracer is not None:
            gw._retire(gw._tracer.exporter.close())
        ctx.tracer = gw._tracer = tracer
    if tls is not None and gw._tls is not None:
        # The listeners were created with the old default context: its SNI callback now
        # picks from the new contexts, so every new handshake gets the new certificates.
        gw._tls.default.sni_callback = tls._on_sni
    gw._refresh_admin(new)
    for name, upstream in kept.items():
        if upstream.cfg != new.upstreams[name]:
            upstream.reweight(new.upstreams[name])
    gw.config, gw._snapshot, gw._upstreams, gw._runtime, gw._limits = new, snapshot, upstreams, runtime, limits
    if retired_log is not None:
        retired_log.close(timeout=0)  # its thread writes what it holds, off the loop
    grace = min(old.drain_timeout, _GRACE_MAX)
    gw._metrics.retire(retired_upstreams)  # their counts stay in /metrics
    gw._config_hash = config_hash(new)
    gw._retire(_retire_later(old, retired_runtime, retired_upstreams, grace))
    took = time.perf_counter() - started
    kept_names = sorted(kept)
    return {"hash": config_hash(new), "seconds": round(took, 4), "routes": len(new.routes),
            "upstreams_kept": kept_names,
            "upstreams_new": sorted(set(upstreams) - set(kept)),
            "upstreams_retired": sorted(u.name for u in retired_upstreams)}


async def _retire_later(old: Config, runtime: RuntimeContext | None, upstreams: list[Upstream],
                        grace: float) -> None:
    """Close what the old config used once requests that started on it had time to end.
    A replaced upstream keeps serving the requests already routed to it (even those
    still waiting for a connection or a body) and closes each connection as it is
    released; it is swept like a live one, so a queued request still gets its 503 at
    `wait_timeout`; it closes when idle or after the grace period."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    try:
        for u in upstreams:
            u.retire()
        while any(u.busy() for u in upstreams) and loop.time() < deadline:
            await asyncio.sleep(0.25)
            for u in upstreams:
                u.sweep(loop.time())
        if runtime is not None:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
    finally:  # also when the gateway stops first: close them now
        for u in upstreams:
            await u.close()
        for policy in old.registry.policies() if runtime is not None else ():
            try:
                await policy.stop(runtime)
            except Exception:  # a plugin's bug must not break the next reload
                log.exception("stopping the replaced runtime of plugin %r failed", policy.name)

