"""The health of an upstream's endpoints: passive (outlier detection) and active checks.

Owns `OutlierDetector` (sans-IO) and `ActiveChecker` (a task: `health_check`). The
detector is one per upstream with `outlier_detection`: it counts, per
endpoint (an index into the upstream's target pools), consecutive 5xx answers and
consecutive connect failures, and ejects an endpoint that reaches either threshold for
`base_ejection_time` x (the times it was ejected), at most `max_ejection_time`. An
ejected endpoint returns by itself when its time is up; a good answer resets its counts.

Invariants:
- At most `max_ejection_percent` of the endpoints are out at once, but one may always
  go (of two endpoints with 50 %, one): a threshold reached beyond that is counted, not
  enforced.
- Every transition (ejected, returned) is logged once, at warning and info.
- `healthy(i, now)` is a comparison: the pick pays nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeplane.config.resilience import HealthCheckConfig, OutlierConfig

log = logging.getLogger("edgeplane.health")


class OutlierDetector:
    __slots__ = ("cfg", "upstream", "names", "errors_5xx", "connect_failures", "ejected_until",
                 "ejections", "ejections_total", "_returned")

    def __init__(self, cfg: OutlierConfig, upstream: str, names: list[str]) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.names = names  # each endpoint's "http://host:port", for logs
        n = len(names)
        self.errors_5xx = [0] * n
        self.connect_failures = [0] * n
        self.ejected_until = [0.0] * n
        self.ejections = [0] * n  # times each was ejected (its next ejection lasts longer)
        self.ejections_total = [0] * n  # counted for the metrics, never reset
        self._returned = [True] * n  # its return was logged (or it was never out)

    def carry(self, previous: OutlierDetector) -> None:
        """A new set of endpoints (DNS): those that stayed keep their counts and ejection."""
        before = {name: j for j, name in enumerate(previous.names)}
        for i, name in enumerate(self.names):
            j = before.get(name)
            if j is not None:
                self.errors_5xx[i], self.connect_failures[i] = previous.errors_5xx[j], previous.connect_failures[j]
                self.ejected_until[i], self.ejections[i] = previous.ejected_until[j], previous.ejections[j]
                self.ejections_total[i], self._returned[i] = previous.ejections_total[j], previous._returned[j]

    def healthy(self, i: int, now: float) -> bool:
        if self.ejected_until[i] <= now:
            if not self._returned[i]:
                self._returned[i] = True
                log.info("upstream %s: endpoint %s returns after its ejection", self.upstream, self.names[i])
            return True
        return False

    def on_success(self, i: int) -> None:
        self.errors_5xx[i] = 0
        self.connect_failures[i] = 0

    def on_5xx(self, i: int, now: float) -> None:
        self.errors_5xx[i] += 1
        limit = self.cfg.consecutive_5xx
        if limit and self.errors_5xx[i] >= limit:
            self._eject(i, now, f"{self.errors_5xx[i]} consecutive 5xx answers")

    def on_connect_failure(self, i: int, now: float) -> None:
        self.connect_failures[i] += 1
        limit = self.cfg.consecutive_connect_failures
        if limit and self.connect_failures[i] >= limit:
            self._eject(i, now, f"{self.connect_failures[i]} consecutive connect failures")

    def _eject(self, i: int, now: float, why: str) -> None:
        if self.ejected_until[i] > now:
            return  # already out (a request that was on its way)
        n = len(self.names)
        out = sum(1 for t in self.ejected_until if t > now)
        if out >= max(1, n * self.cfg.max_ejection_percent // 100):
            return  # the cap: counted, not enforced
        self.ejections[i] += 1
        self.ejections_total[i] += 1
        seconds = min(self.cfg.base_ejection_time * self.ejections[i], self.cfg.max_ejection_time)
        self.ejected_until[i] = now + seconds
        self._returned[i] = False
        self.errors_5xx[i] = self.connect_failures[i] = 0
        log.warning("upstream %s: endpoint %s ejected for %.1fs (%s; ejection %d)",
                    self.upstream, self.names[i], seconds, why, self.ejections[i])

    def telemetry(self, i: int, now: float) -> dict[str, object]:
        return {"healthy": self.ejected_until[i] <= now, "ejections": self.ejections_total[i],
                "ejected_for": round(max(self.ejected_until[i] - now, 0.0), 3),
                "consecutive_5xx": self.errors_5xx[i], "consecutive_connect_failures": self.connect_failures[i]}


class ActiveChecker:
    """`health_check`: every `interval`, `GET path` to each target, with `timeout`, over
    a connection of its own (a probe pool of one connection per target, outside the
    target's pool and its limits: a busy target is not a sick one); `unhealthy` failures
    in a row (a status not in `statuses`, a connect failure, a timeout) make a target
    unhealthy, `healthy` passes in a row healthy again. Targets start healthy (or as the
    `previous` checker saw them, by name); every transition is logged once."""

    __slots__ = ("cfg", "upstream", "pools", "healthy", "passes", "failures", "checks", "_task", "probes")

    def __init__(self, cfg: HealthCheckConfig, upstream: str, pools: list[Any],
                 previous: ActiveChecker | None = None) -> None:
        from edgeplane.config.model import PoolConfig
        from edgeplane.upstream.pool import TargetPool

        self.cfg = cfg
        self.upstream = upstream
        self.pools = pools
        n = len(pools)
        self.healthy = [True] * n
        self.passes = [0] * n
        self.failures = [0] * n
        if previous is not None:  # a new set of endpoints (DNS): those that stayed keep their state
            before = {p.name: i for i, p in enumerate(previous.pools)}
            for i, pool in enumerate(pools):
                j = before.get(pool.name)
                if j is not None:
                    self.healthy[i], self.passes[i], self.failures[i] = (
                        previous.healthy[j], previous.passes[j], previous.failures[j])
        probe = PoolConfig(max_connections=1, max_idle=1, idle_timeout=max(2 * cfg.interval, 1.0),
                           connect_timeout=cfg.timeout, max_waiters=1, wait_timeout=cfg.timeout)
        loop = asyncio.get_running_loop()
        self.probes = [TargetPool(p.target, probe, loop, p.ssl, p.server_hostname, upstream,
                                  p.host if p.host != p.target.host else None) for p in pools]
        self.checks = 0
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._check(i) for i in range(len(self.pools))))
            self.checks += 1
            await asyncio.sleep(self.cfg.interval)

    async def _check(self, i: int) -> None:
        from edgeplane.upstream.client import FetchError, fetch  # (client imports pool, as this does)

        pool = self.pools[i]
        try:
            status, _, _ = await fetch(self.probes[i], "GET", self.cfg.path, timeout=self.cfg.timeout,
                                       max_bytes=64 * 1024)
            ok, why = status in self.cfg.statuses, f"answered {status}"
        except FetchError as exc:
            ok, why = False, str(exc)
        if ok:
            self.failures[i] = 0
            self.passes[i] += 1
            if not self.healthy[i] and self.passes[i] >= self.cfg.healthy:
                self.healthy[i] = True
                log.info("upstream %s: %s is healthy again (%d checks passed)", self.upstream, pool.name,
                         self.passes[i])
        else:
            self.passes[i] = 0
            self.failures[i] += 1
            if self.healthy[i] and self.failures[i] >= self.cfg.unhealthy:
                self.healthy[i] = False
                log.warning("upstream %s: %s is unhealthy (%d checks of %s failed; last: %s)", self.upstream,
                            pool.name, self.failures[i], self.cfg.path, why)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for probe in self.probes:
            probe.retire()  # its idle connection closes (one in use closes when released)
