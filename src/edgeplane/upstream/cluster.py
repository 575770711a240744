"""A named upstream: its target pools, which one a request goes to, and its retry budget.

Owns `Upstream`. `pick(exclude)` chooses among the endpoints a request may use:
1. the usable ones: taking requests (weight > 0), not ejected by outlier detection
   (`upstream.health`), and, without `outlier_detection`, not failed to connect within
   the last second; never one in `exclude` (a retry's earlier tries) while another is
   usable;
2. the panic threshold, as Envoy's: when fewer than `panic_threshold` % of the endpoints
   are usable, every endpoint is (better a chance on all than a flood on few);
3. the `lb` policy among them: `round_robin` (smooth weighted with weights,
   `balance.SmoothWeighted`), `least_request` (the less busy of two picked at random:
   power of two choices, Envoy's default), or `random`.

Invariants: the pick is synchronous and allocation-light on the usual path (one
endpoint, or round robin with all healthy); a retry never goes to an endpoint it
already tried while another exists. The retry budget (`retries.budget`) counts the
retries in flight against the requests in flight on this upstream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from typing import TYPE_CHECKING, Any

from edgeplane.upstream.balance import SmoothWeighted, uniform
from edgeplane.upstream.client import FetchError
from edgeplane.upstream.dns import TargetResolver
from edgeplane.upstream.hashing import HashRing, Maglev, hash64, request_key
from edgeplane.upstream.health import ActiveChecker, OutlierDetector
from edgeplane.upstream.pool import TargetPool

if TYPE_CHECKING:
    from edgeplane.config.model import Target, UpstreamConfig

_randrange = random.randrange


class Upstream:
    __slots__ = ("name", "pools", "_next", "loop", "cfg", "_weighted", "splits", "detector", "_policy",
                 "retries_active", "retries_total", "retries_refused", "checker", "breaker_open", "_hash",
                 "weights", "resolvers", "addresses", "retired_pools", "_ssl")

    def __init__(self, cfg: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = cfg.name
        self.cfg = cfg  # a reload keeps this upstream (and its pools) while it is unchanged
        self.loop = loop
        self._ssl = None
        if any(t.scheme == "https" for t in cfg.targets):
            from edgeplane.http.tls import client_context

            self._ssl = client_context(cfg.tls)
        self.pools = [self._pool(t, None) for t in cfg.targets]
        self.weights = list(cfg.weights) or [1] * len(self.pools)  # per endpoint
        self.resolvers: list[TargetResolver] = []  # hostname targets (`resolve`)
        self.addresses: dict[str, list[str]] = {}  # hostname -> its addresses now
        self.retired_pools: list[TargetPool] = []  # endpoints a new answer dropped, draining
        for i, pool in enumerate(self.pools):
            pool.index = i
            pool.owner = self
        self._next = 0
        self._weighted: SmoothWeighted | None = None
        self.detector: OutlierDetector | None = None
        self._policy = "round_robin"
        self.splits: dict[tuple[Any, ...], SmoothWeighted] = {}  # route splits it leads (`balance.Split`)
        self.retries_active = 0  # retries in flight (the budget's numerator)
        self.retries_total = 0
        self.retries_refused = 0  # retries the budget did not allow
        self.checker: ActiveChecker | None = None
        self.breaker_open: dict[str, int] = {}  # requests a circuit-breaker limit answered 503, by limit
        self._hash: HashRing | Maglev | None = None  # ring_hash / maglev
        self.reconfigure(cfg)

    def _pool(self, target: Target, address: str | None) -> TargetPool:
        cfg = self.cfg
        return TargetPool(target, cfg.pool, self.loop, self._ssl if target.scheme == "https" else None,
                          cfg.tls.server_name, cfg.name, address)

    async def resolve(self) -> list[str]:
        """Resolve the hostname targets with aiodns (`upstream.dns`) and keep them
        resolved; the names that did not resolve now (each: why)."""
        hosts = sorted({t.host for t in self.cfg.targets if _hostname(t)})
        self.resolvers = [TargetResolver(self.name, h, self.cfg.resilience.dns, self.set_addresses) for h in hosts]
        if hosts:
            self.set_addresses(None, [])  # the endpoints are what the names resolve to, nothing before
        failed = await asyncio.gather(*(r.first() for r in self.resolvers))
        return [f"{r.host}: {why}" for r, why in zip(self.resolvers, failed, strict=True) if why]

    def set_addresses(self, host: str | None, addresses: list[str]) -> None:
        """A name's new answer: the endpoints become each target's addresses (a pool per
        address; unchanged ones keep their pools and connections, dropped ones drain)."""
        if host is not None:
            self.addresses[host] = addresses
        old: dict[tuple[Target, str | None], TargetPool | None] = {
            (p.target, p.host if _hostname(p.target) else None): p for p in self.pools}
        pools, weights = [], []
        for i, target in enumerate(self.cfg.targets):
            weight = self.cfg.weights[i] if self.cfg.weights else 1
            for address in (self.addresses.get(target.host, []) if _hostname(target) else [None]):
                pools.append(old.pop((target, address), None) or self._pool(target, address))
                weights.append(weight)
        for gone in old.values():
            if gone is not None:
                gone.retire()
                self.retired_pools.append(gone)
        self.pools, self.weights = pools, weights
        for i, pool in enumerate(pools):
            pool.index = i
            pool.owner = self
        self._next = 0
        previous, checker = self.detector, self.checker
        self.detector = self.checker = None  # rebuilt for the new endpoints ...
        if checker is not None:
            checker.close()
        self.reconfigure(self.cfg, checker)
        if previous is not None and self.detector is not None:
            self.detector.carry(previous)  # ... with the state of those that stayed

    def reconfigure(self, cfg: UpstreamConfig, previous_checker: ActiveChecker | None = None) -> None:
        """Weights and resilience settings (at start, or a reload that changed only
        those: the pools and their connections stay)."""
        self.cfg = cfg
        if len(self.weights) == len(cfg.targets):  # (else: endpoints from DNS, set by `set_addresses`)
            self.weights = list(cfg.weights) or [1] * len(self.pools)
        weights = self.weights
        self._weighted = None if uniform(weights) else SmoothWeighted(weights)
        res = cfg.resilience
        self._policy = res.lb
        names = [p.name for p in self.pools]
        self._hash = (HashRing(names, weights) if res.lb == "ring_hash" else Maglev(names, weights)
                      if res.lb == "maglev" else None)
        if res.outlier is None:
            self.detector = None
        elif self.detector is None or self.detector.cfg != res.outlier or len(self.detector.names) != len(names):
            self.detector = OutlierDetector(res.outlier, self.name, [p.name for p in self.pools])
        for pool in self.pools:
            pool.detector = self.detector
        if self.checker is not None and self.checker.cfg != res.health_check:
            self.checker.close()
            self.checker = None
        if res.health_check is not None and self.checker is None:
            self.checker = ActiveChecker(res.health_check, self.name, self.pools, previous_checker)

    reweight = reconfigure  # (the name a reload of weights used)

    def usable(self, i: int, now: float) -> bool:
        if self.weights[i] <= 0:
            return False
        if self.checker is not None and not self.checker.healthy[i]:
            return False
        detector = self.detector
        if detector is not None:
            return detector.healthy(i, now)
        return self.pools[i].down_until <= now

    def available(self, now: float) -> bool:
        """Whether an endpoint that takes requests is usable."""
        return any(self.usable(i, now) for i in range(len(self.pools)))

    def pick(self, exclude: tuple[TargetPool, ...] = (), req: Any = None, peer: str = "") -> TargetPool:
        pools = self.pools
        n = len(pools)
        if n == 1:
            return pools[0]
        if not n:
            raise NoEndpoint(f"upstream {self.name} has no endpoint: its names do not resolve")
        now = self.loop.time()
        if self._hash is not None and req is not None:
            key = request_key(req, self.cfg.resilience.lb_key, peer)
            if key is not None:  # sticky: the key's endpoint, or the next usable one
                i = self._hash.pick(hash64(key), lambda i: self.usable(i, now) and pools[i] not in exclude)
                if i >= 0:
                    return pools[i]
        if not exclude and self._policy == "round_robin" and self.detector is None and self.checker is None:
            return self._round_robin(now)  # the usual path, as before
        healthy = [i for i in range(n) if self.usable(i, now)]
        if len(healthy) * 100 < n * self.cfg.resilience.panic_threshold:
            healthy = [i for i in range(n) if self.weights[i] > 0]  # panic: all
        fresh = [i for i in healthy if pools[i] not in exclude] or healthy or list(range(n))
        if self._policy == "least_request" and len(fresh) > 1:
            k = len(fresh)  # two distinct endpoints at random: the less busy one
            x = _randrange(k)
            y = _randrange(k - 1)
            a, b = fresh[x], fresh[y + 1 if y >= x else y]
            return pools[a] if _load(pools[a]) <= _load(pools[b]) else pools[b]
        if self._policy == "random":
            return pools[fresh[_randrange(len(fresh))]]
        weighted = self._weighted
        if weighted is not None:
            allowed = set(fresh)
            i = weighted.pick(allowed.__contains__)
            return pools[i if i >= 0 else fresh[0]]
        if exclude:  # a retry: the next one in turn that it has not tried, the turn left alone
            return pools[next((i for k in range(n) if (i := (self._next + k) % n) in fresh), fresh[0])]
        for _ in range(n):
            i = self._next
            self._next = (self._next + 1) % n
            if i in fresh:
                return pools[i]
        return pools[fresh[0]]

    def _round_robin(self, now: float) -> TargetPool:
        pools = self.pools
        weighted = self._weighted
        if weighted is not None:
            i = weighted.pick(lambda i: pools[i].down_until <= now)
            return pools[i if i >= 0 else max(weighted.pick(), 0)]  # all down: as round robin does
        n = len(pools)
        for _ in range(n):
            pool = pools[self._next]
            self._next = (self._next + 1) % n
            if pool.down_until <= now:
                return pool
        return pool

    def active(self) -> int:
        """Requests in flight on this upstream (in use or waiting for a connection)."""
        return sum(p.in_use + len(p.waiters) for p in self.pools)

    def tripped(self, pool: TargetPool) -> str | None:
        """The `circuit_breaker` limit a new request to `pool` would pass (then counted),
        or None: in flight, waiting (when `pool` has no idle connection), connections."""
        cb = self.cfg.resilience.circuit_breaker
        if cb is None:
            return None
        limit = None
        if cb.max_requests and self.active() >= cb.max_requests:
            limit = "max_requests"
        elif not pool.idle:
            if cb.max_pending and sum(len(p.waiters) for p in self.pools) >= cb.max_pending:
                limit = "max_pending"
            elif cb.max_connections and sum(len(p.conns) + p.connecting for p in self.pools) >= cb.max_connections:
                limit = "max_connections"
        if limit is not None:
            self.breaker_open[limit] = self.breaker_open.get(limit, 0) + 1
        return limit

    def retry_allowed(self, budget: float, minimum: int, budgeted: bool = True) -> bool:
        """Whether one more retry fits the budget and `circuit_breaker.max_retries` (then
        counted as in flight). Not `budgeted`: a retry after a connect failure, which
        adds no work upstream (the first try did none), so the budget does not apply."""
        cb = self.cfg.resilience.circuit_breaker
        if cb is not None and cb.max_retries and self.retries_active >= cb.max_retries:
            self.breaker_open["max_retries"] = self.breaker_open.get("max_retries", 0) + 1
            return False  # (counted as the circuit breaker's, not the budget's)
        if budgeted and self.retries_active >= max(minimum, int(budget * self.active())):
            self.retries_refused += 1
            return False
        self.retries_active += 1
        self.retries_total += 1
        return True

    def sweep(self, now: float) -> None:
        for pool in self.pools:
            pool.sweep(now)
        if self.retired_pools:
            for pool in self.retired_pools:
                pool.sweep(now)
            self.retired_pools = [p for p in self.retired_pools if p.busy()]

    def retire(self) -> None:
        for resolver in self.resolvers:
            resolver.close()
        if self.checker is not None:
            self.checker.close()
        for pool in self.pools:
            pool.retire()

    def busy(self) -> bool:
        return any(pool.busy() for pool in self.pools)

    async def close(self) -> None:
        for resolver in self.resolvers:
            resolver.close()
        if self.checker is not None:
            self.checker.close()
        for pool in [*self.pools, *self.retired_pools]:
            await pool.close()

    def telemetry(self, now: float) -> dict[str, Any]:
        targets = [p.telemetry(now) for p in self.pools]
        if self.detector is not None:
            for i, t in enumerate(targets):
                t["outlier"] = self.detector.telemetry(i, now)
                t["health"] = "up" if self.detector.healthy(i, now) else "ejected"
        if self.checker is not None:
            for i, t in enumerate(targets):
                t["active_check"] = {"healthy": self.checker.healthy[i], "passes": self.checker.passes[i],
                                     "failures": self.checker.failures[i]}
                if not self.checker.healthy[i]:
                    t["health"] = "unhealthy"
        return {"name": self.name, "lb": self._policy, "targets": targets,
                "retries": {"total": self.retries_total, "active": self.retries_active,
                            "refused_by_budget": self.retries_refused},
                "circuit_breaker_open": dict(self.breaker_open)}


async def resolve_all(upstreams: list[Upstream], strict: bool) -> None:
    """Resolve every upstream's hostname targets; with `strict` (`serve --strict`) a name
    that does not resolve closes them all and raises RuntimeError naming each."""
    unresolved = [problem for u in upstreams for problem in await u.resolve()]
    if unresolved and strict:
        for upstream in upstreams:
            await upstream.close()
        raise RuntimeError("--strict: upstream names do not resolve: " + "; ".join(unresolved))


class NoEndpoint(FetchError):
    """The upstream has no endpoint now (its hostnames do not resolve): 503."""


def _hostname(target: Target) -> bool:
    """Whether `target` names a host to resolve (not an IP address, not a Unix socket)."""
    if target.scheme == "unix":
        return False
    try:
        ipaddress.ip_address(target.host)
    except ValueError:
        return True
    return False


def _load(pool: TargetPool) -> int:
    return pool.in_use + pool.connecting + len(pool.waiters)
