"""A worker's samples: every family of `families`, gathered from where each count lives.

Owns `WorkerMetrics`, held by each `Gateway`: the request arrays (`metrics`), the
counters carried across reloads and restarts, and `samples()`, which reads the rest
from the gateway when asked (off the hot path):

- requests, durations and bytes: `RequestMetrics`; authorizer outcomes:
  `AuthorizerOutcomes`;
- gateway errors and connections: the data listeners' `ServerContext.stats`;
- upstream pools: the current pools, the pools of upstreams a reload replaced (until
  they have drained; then their counts are folded into `carried`, so a counter never
  goes down when a reload replaces its pool);
- reloads, the config hash, the build;
- `base`: what the previous worker of this slot had counted (`aggregate.load_base`).
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from edgeplane.observability import aggregate, stats_view
from edgeplane.observability.aggregate import Samples, add
from edgeplane.observability.metrics import AuthorizerOutcomes, RequestMetrics

try:  # the installed distribution's version (not `edgeplane.__version__`: no import of the package root)
    VERSION = metadata.version("edgeplane")
except metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "unknown"

_UPSTREAM_COUNTERS = (("edgeplane_upstream_connections_opened", "opened"),
                      ("edgeplane_upstream_connections_reused", "reused"),
                      ("edgeplane_upstream_connect_failures", "connect_failures"),
                      ("edgeplane_upstream_requests", "requests"))


class WorkerMetrics:
    def __init__(self) -> None:
        self.requests = RequestMetrics()
        self.authorizers = AuthorizerOutcomes()  # filled by the authorizer stages
        self.base: Samples = {}  # the previous worker of this slot's counters
        self.carried: Samples = {}  # counters of upstream pools that are gone
        self.retired: list[Any] = []  # upstreams a reload replaced, still draining
        # With `workers: N`: (the supervisor's private directory, this worker's index, N)
        self.files: tuple[str, int, int] | None = None
        # Counters read from objects a reload may replace (a JWKS source, an authorizer
        # client): the object and its value last seen, and what replaced objects counted.
        self._seen: dict[tuple[str, tuple[str, ...]], tuple[Any, float]] = {}
        self._offset: dict[tuple[str, tuple[str, ...]], float] = {}

    def share(self, run_dir: str, index: int, n: int) -> None:
        """Work as worker `index` of `n`: continue the counts of this slot's previous
        worker, and write them where every worker reads them (`aggregate`)."""
        self.files = (run_dir, index, n)
        self.base = aggregate.load_base(run_dir, index)

    def attach(self, snapshot: Any) -> None:
        """Give each compiled route of `snapshot` its (stage, canary, host, route key)'s arrays."""
        stages = snapshot.stages
        staged = [(name, False, sub) for name, sub in stages.snapshots.items()] if stages is not None \
            else [("$default", False, snapshot)]
        if stages is not None:  # a canary's side counts apart: the two can be compared
            staged += [(name, True, canary.snapshot) for name, canary in stages.canaries.items()]
        for stage, canary, sub in staged:
            for route in sub.routes:
                rc = route.config
                route.metrics = self.requests.route(rc.host if rc is not None else None, route.key, stage, canary)

    def flush(self, gateway: Any) -> None:
        """Write this worker's samples and `/stats` for the others (once a second, and
        before a scrape)."""
        if self.files is not None:
            run_dir, index, _ = self.files
            try:
                aggregate.write(run_dir, index, self.samples(gateway))
                stats_view.write(run_dir, index, gateway.stats())
            except OSError:  # the supervisor's directory is gone: it is stopping
                pass

    def stats(self, gateway: Any, per_worker: bool) -> dict[str, Any]:
        """The answer to `GET /stats`: every live worker's, merged (`stats_view`)."""
        own = gateway.stats()
        if self.files is None:
            return stats_view.merged(own, [], per_worker)
        run_dir, index, n = self.files
        try:
            stats_view.write(run_dir, index, own)
        except OSError:
            pass
        return stats_view.merged(own, stats_view.read_all(run_dir, n), per_worker)

    def scrape(self, gateway: Any, accept: str) -> tuple[bytes, bytes]:
        """The answer to `GET /metrics`: every worker's samples, merged."""
        # prometheus_client (~10 MiB) is loaded at the first scrape, not in every worker
        from edgeplane.observability.exposition import render

        if self.files is None:
            return render(self.samples(gateway), accept)
        self.flush(gateway)
        run_dir, _, n = self.files
        return render(aggregate.merge(aggregate.read_all(run_dir, n)), accept)

    def retire(self, upstreams: list[Any]) -> None:
        self.retired.extend(upstreams)

    def _upstreams(self, current: list[Any]) -> Samples:
        out: Samples = {name: {} for name, _ in _UPSTREAM_COUNTERS}
        out["edgeplane_upstream_connections_open"] = {}
        out["edgeplane_upstream_connections_idle"] = {}
        still = []
        for upstream in self.retired:
            if upstream.busy():
                still.append(upstream)
            else:  # drained: its counts are final
                add(self.carried, _pool_samples(upstream, gauges=False), gauges=False)
        self.retired = still
        for upstream in [*current, *still]:
            add(out, _pool_samples(upstream, gauges=True))
        add(out, self.carried)
        return out

    def samples(self, gateway: Any) -> Samples:
        out = self.requests.samples()
        out.update(self.authorizers.samples())
        ctx = gateway._context
        if ctx is not None:
            out["edgeplane_gateway_errors"] = {(kind,): n for kind, n in ctx.stats.errors.items()}
            out["edgeplane_connections"] = {("data",): ctx.stats.connections_total}
            refused = ctx.stats.refused
            out["edgeplane_throttled_requests"] = {(level,): n for (what, level), n in refused.items()
                                                   if what == "throttle"}
            out["edgeplane_quota_refusals"] = {(plan,): n for (what, plan), n in refused.items() if what == "quota"}
            out["edgeplane_websocket_messages"] = dict(ctx.stats.ws_messages)
            out["edgeplane_websocket_closes"] = dict(ctx.stats.ws_closes)
            out["edgeplane_open_connections"] = {("data",): len(ctx.connections)}
            open_ws: dict[tuple[str, ...], Any] = {("proxied",): 0, ("api",): 0}
            for ws in ctx.websockets:
                kind = (getattr(ws, "ws_kind", "proxied"),)
                open_ws[kind] = open_ws.get(kind, 0) + 1
            out["edgeplane_websockets_open"] = open_ws
        add(out, self._upstreams(list(gateway._upstreams.values())))
        self._monotonic(out, _plugin_samples(gateway))
        tracer = gateway._tracer
        if tracer is not None:  # an exporter a reload makes goes on from the old one's counts
            e = tracer.exporter
            out["edgeplane_trace_spans"] = {("exported",): e.exported, ("dropped",): e.dropped,
                                            ("failed",): e.failed}
        access_log = gateway._access_log
        if access_log is not None:  # so does a new access log
            out["edgeplane_access_log_lines"] = {(): access_log.written}
            out["edgeplane_access_log_dropped_lines"] = {(): access_log.dropped}
        reloads = gateway._reloads
        out["edgeplane_reloads"] = {("success",): reloads["ok"], ("failure",): reloads["failed"]}
        out["edgeplane_config_info"] = {(gateway._config_hash,): 1}
        out["edgeplane_build_info"] = {(VERSION, platform.python_version()): 1}
        add(out, self.base, gauges=False)
        return {name: values for name, values in out.items() if values}


    def _monotonic(self, out: Samples, found: list[tuple[str, tuple[str, ...], Any, float]]) -> None:
        """Add `found` (family, labels, source object, value) to `out`, keeping each
        series from going down: when a reload replaced its source object, what the old
        one had counted is kept."""
        for name, labels, source, value in found:
            key = (name, labels)
            seen = self._seen.get(key)
            if seen is not None and seen[0] is not source:
                self._offset[key] = self._offset.get(key, 0) + seen[1]
            self._seen[key] = (source, value)
            out.setdefault(name, {})[labels] = value + self._offset.get(key, 0)


def _plugin_samples(gateway: Any) -> list[tuple[str, tuple[str, ...], Any, float]]:
    """Authorizer and WebSocket API counters, with the objects that count them: the
    plugins' per-gateway state (JWKS sources, custom-authorizer clients) and the
    WebSocket API registry."""
    out: list[tuple[str, tuple[str, ...], Any, float]] = []
    runtime = gateway._runtime
    if runtime is not None:
        for state in runtime.state.values():
            metric_samples = getattr(state, "metric_samples", None)
            if metric_samples is not None:  # a plugin's runtime that counts for itself (the cache)
                out += metric_samples()
                continue
            if not isinstance(state, dict):
                continue
            for name, source in state.items():
                if hasattr(source, "fetches") and hasattr(source, "failures"):  # a JWKS source
                    out += [("edgeplane_jwks_fetches", (name,), source, source.fetches),
                            ("edgeplane_jwks_fetch_failures", (name,), source, source.failures)]
                elif hasattr(source, "calls") and hasattr(source, "failures"):  # a custom authorizer
                    out += [("edgeplane_authorizer_calls", (name,), source, source.calls),
                            ("edgeplane_authorizer_call_failures", (name,), source, source.failures)]
    registry = gateway._ws_registry
    if registry is not None and registry.apis:
        stats = registry.stats
        out.append(("edgeplane_websocket_api_connections", (), registry, stats.get("opened", 0)))
    return out


def _pool_samples(upstream: Any, *, gauges: bool) -> Samples:
    out: Samples = {name: {} for name, _ in _UPSTREAM_COUNTERS}
    out["edgeplane_upstream_ejections"] = {}
    out["edgeplane_upstream_retries"] = {(upstream.name,): upstream.retries_total}
    out["edgeplane_upstream_retries_refused"] = {(upstream.name,): upstream.retries_refused}
    out["edgeplane_upstream_circuit_breaker_open"] = {(upstream.name, limit): n
                                                      for limit, n in upstream.breaker_open.items()}
    if gauges:
        out["edgeplane_upstream_connections_open"] = {}
        out["edgeplane_upstream_connections_idle"] = {}
        out["edgeplane_upstream_endpoint_healthy"] = {}
    now = upstream.loop.time()
    detector = upstream.detector
    for i, pool in enumerate(upstream.pools):
        labels = (upstream.name, pool.name)
        for family, attr in _UPSTREAM_COUNTERS:
            out[family][labels] = getattr(pool, attr)
        out["edgeplane_upstream_ejections"][labels] = detector.ejections_total[i] if detector is not None else 0
        if gauges:
            out["edgeplane_upstream_connections_open"][labels] = len(pool.conns)
            out["edgeplane_upstream_connections_idle"][labels] = len(pool.idle)
            out["edgeplane_upstream_endpoint_healthy"][labels] = 1 if upstream.usable(i, now) else 0
    return out
