"""Cluster mode: throttles and quotas shared by several gateway hosts through one Redis.

What this module owns
---------------------
- `RedisLimiter`: one per worker process. The Redis client (redis-py's asyncio client),
  the batched lease fetches, Redis health (up, or down and probed), and the counters the
  admin `/stats` shows.
- `LeasedLimit`: one configured limit (server-wide, a route, a route's per-client level,
  a usage plan's per-key level) with its rate, burst, lease size and Redis key prefix;
  `bucket(key)` returns the `LeasedBucket` of a client key from a bounded LRU map.
- `LeasedBucket`: this worker's lease on one Redis bucket. It offers the level interface
  of `throttle.LevelChain` (`wait`, `spend`, `state`, `_policy`), so the chain, the 429s
  and the RateLimit headers are the same code as on one host.
- `RedisQuotaStore`: usage-plan quota counts in Redis, driving a `quota.QuotaCounter`
  exactly as `quota.QuotaStore` does with SQLite (`aload`, `aflush`, `aclose`).
- `redis_usage`: the rows of `edgeplane usage` read from Redis.

It does not own which limits exist (`stages`), config validation (`config`), or the
timer that flushes quotas (the gateway tick).

The bucket in Redis (script `TAKE_SCRIPT`)
------------------------------------------
Each bucket is a Redis hash ``{tokens, ts}`` under ``PREFIX t:LIMIT:CLIENT``. One call of
the script, atomically: refill from Redis's own clock (``TIME``: the hosts' clocks never
matter; a backwards step mints nothing and re-bases, as `throttle.TokenBucket` does),
debit ``debt`` (requests this host already admitted on credit) unconditionally, grant
``min(want, floor(tokens))`` whole tokens if at least one is there, and set the key to
expire when the bucket would be full again (an absent key *is* a full bucket). It
returns ``[granted, level after]``.

Leasing: the request path never waits for Redis
-----------------------------------------------
A host holds, per bucket, tokens it was granted (``tokens``) and requests it admitted on
credit (``debt``). A check (`LeasedBucket.wait` / `spend`):

1. spends a held token if there is one; when fewer than half a lease is left, a refill
   is queued (it does not wait for it);
2. else, if the last answer said the bucket is empty, refuses until the time Redis's
   level will reach one token (``Retry-After`` from that);
3. else admits **on credit** while ``debt < lease`` and queues a refill that settles the
   debt (this is what lets a client's first request through without a round trip);
4. else refuses (the host is a whole lease ahead of Redis and waits for its answer).

Refills queued during one event-loop iteration go to Redis in one pipeline; only one
pipeline is in flight per worker (the next collects what queued meanwhile), so Redis sees
at most one round trip per worker at a time, whatever the request rate.

Accuracy bound (H hosts x workers, each holding at most ``lease`` tokens)
-------------------------------------------------------------------------
Every admitted request is debited in Redis: granted tokens before they are spent, credit
right after. So the long-run rate is exact. A worker may be ahead of the ideal single
bucket by what it holds (tokens taken when Redis was at some level and spent later, when
Redis may be full again) plus its unsettled credit, each at most ``lease``: over any
window of length T

    admitted <= burst + rate x T + 2 x W x lease            (W = workers on all hosts)

and tokens a worker holds but does not spend (at most ``lease`` each) are the under-
admission. ``lease`` is ``cluster.lease`` x burst (default 0.1: with burst 100, 10), but
at least 4 or the burst if smaller (`lease_tokens`). Measured: benches/RESULTS.md
"Cluster mode".

When Redis is down or slow
--------------------------
Every pipeline has ``cluster.timeout``. A connection error, a timeout or a Redis error
marks Redis down: logged once (and once again when it is back), counted
(``redis_errors``), and until a probe (``PING``, at most one per ``retry_interval``)
succeeds every leased level answers as configured: ``failure_mode: open`` admits without
counting; ``closed`` refuses with 503 (`throttle.UNAVAILABLE`). Nothing on the request
path waits, so nothing hangs. Debts that could not be settled stay and are sent with the
next refill after Redis is back.

Quotas in Redis
---------------
Counts live under ``PREFIX q:PERIOD:KEYID`` (period keys as `quota.QuotaPeriod`). The
tick's `RedisQuotaStore.aflush` sends this worker's deltas with ``INCRBY`` and reads back
the totals of every key it knows in the live periods (one script call, applied once per
flush id, so a call that timed out after Redis applied it is not counted twice when it is
sent again); the counter admits against those totals plus its own admissions since. The bound is `quota.QuotaStore`'s:
a key's quota can be exceeded by what *other* workers admitted in two flush intervals.
If Redis is down the deltas stay in memory and are sent when it is back (lost only if
the process dies first). Keys expire 35 days after their period ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from edgeplane.policies.quota.store import QuotaCounter, QuotaPeriod
from edgeplane.policies.throttle.buckets import UNAVAILABLE, Policy

if TYPE_CHECKING:
    from edgeplane.config.model import ClusterConfig

__all__ = ["RedisLimiter", "LeasedLimit", "LeasedBucket", "RedisQuotaStore", "redis_usage", "TAKE_SCRIPT"]

log = logging.getLogger("edgeplane.cluster")

TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local debt = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
if tokens == nil or ts == nil then
  tokens = burst
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
end
tokens = tokens - debt
local grant = 0
if want > 0 and tokens >= 1 then
  grant = math.min(want, math.floor(tokens))
  tokens = tokens - grant
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
local ttl = math.ceil((burst - tokens) / rate * 1000) + 1000
if ttl > 2592000000 then ttl = 2592000000 end
redis.call('PEXPIRE', KEYS[1], ttl)
return {grant, string.format('%.17g', tokens)}
"""

# One quota flush: KEYS = [flush marker, the batch's keys..., keys only read...];
# ARGV = [n, n deltas, n TTLs]. Applied once per flush id (the marker), then every key's
# total is returned (absent = 0).
_QUOTA_SCRIPT = """
local n = tonumber(ARGV[1])
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) then
  for i = 1, n do
    redis.call('INCRBY', KEYS[i + 1], ARGV[i + 1])
    redis.call('EXPIRE', KEYS[i + 1], ARGV[n + i + 1])
  end
end
local out = {}
for i = 2, #KEYS do
  out[i - 1] = redis.call('GET', KEYS[i]) or '0'
end
return out
"""

_RETENTION = 35 * 86400  # quota keys outlive their period by this long (for `edgeplane usage`)
_MAX_KEY_BYTES = 128     # longer client keys are hashed (a header value can be 8 KiB)
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)  # what "Redis is down or slow" looks like


def _client_part(key: Any) -> bytes:
    if key is None:
        return b"-"  # the shared bucket of clients whose key could not be resolved
    raw = key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_KEY_BYTES:
        return b"#" + hashlib.sha256(raw).hexdigest().encode()
    return b"=" + raw


class LeasedBucket:
    """This worker's lease on one Redis bucket (see the module docstring, "Leasing")."""

    __slots__ = ("limit", "rkey", "tokens", "debt", "sent", "inflight", "blocked_until",
                 "remote", "last_used", "_policy")

    def __init__(self, limit: LeasedLimit, rkey: bytes) -> None:
        self.limit = limit
        self.rkey = rkey
        self.tokens = 0.0          # granted by Redis, not spent yet
        self.debt = 0              # admitted on credit, not yet debited in Redis
        self.sent = 0              # part of `debt` carried by the refill in flight
        self.inflight = False
        self.blocked_until = 0.0   # Redis said empty: no credit before this time
        self.remote = float(limit.burst)  # Redis's level at its last answer (headers only)
        self.last_used = 0.0
        self._policy = limit.policy

    def wait(self, now: float) -> float:
        limiter = self.limit.limiter
        if not limiter.up:
            return limiter.when_down(now)
        if self.tokens >= 1.0:
            return 0.0
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.debt < self.limit.lease:
            return 0.0
        if not self.inflight:
            limiter.refill(self)
        return 1.0 / self.limit.rate

    def spend(self, now: float) -> tuple[int, float]:
        self.last_used = now
        limit = self.limit
        if limit.limiter.up:  # (failing open: not counted anywhere)
            if self.tokens >= 1.0:
                self.tokens -= 1.0
            else:
                self.debt += 1
            if not self.inflight and self.tokens < limit.low_water:
                limit.limiter.refill(self)
        return self.state(now)

    def state(self, now: float) -> tuple[int, float]:
        # An estimate between answers: what Redis had plus what this host holds.
        limit = self.limit
        level = self.remote + self.tokens - self.debt
        return (int(level) if level > 0 else 0), max(0.0, (limit.burst - level) / limit.rate)

    def answered(self, now: float, granted: int, level: float) -> None:
        self.inflight = False
        self.debt -= self.sent
        self.sent = 0
        self.tokens += granted
        self.remote = level
        if granted == 0 and level < 1.0:
            self.blocked_until = now + (1.0 - level) / self.limit.rate

    def failed(self) -> None:
        self.inflight = False
        self.sent = 0  # the debt stays; it is sent again with the next refill


class LeasedLimit:
    """One configured limit in Redis; per-client limits keep a bounded LRU of buckets."""

    __slots__ = ("limiter", "name", "rate", "burst", "lease", "low_water", "policy",
                 "prefix", "_buckets", "_single", "max_entries", "idle_ttl")

    def __init__(self, limiter: RedisLimiter, name: str, rate: float, burst: int, policy: str,
                 keyed: bool, max_entries: int = 100_000, idle_ttl: float = 60.0) -> None:
        self.limiter = limiter
        self.name = name
        self.rate = float(rate)
        self.burst = int(burst)
        self.lease = lease_tokens(self.burst, limiter.config.lease)
        self.low_water = self.lease / 2.0
        self.policy = Policy(policy, self.rate, self.burst)
        self.prefix = limiter.prefix + b"t:" + name.encode("utf-8") + b":"
        self.max_entries = max_entries
        self.idle_ttl = idle_ttl
        self._buckets: OrderedDict = OrderedDict()
        self._single = None if keyed else LeasedBucket(self, self.prefix + b"-")

    def bucket(self, key: Any = None) -> LeasedBucket:
        if self._single is not None:
            return self._single
        buckets = self._buckets
        b = buckets.get(key)
        if b is None:
            b = buckets[key] = LeasedBucket(self, self.prefix + _client_part(key))
            if len(buckets) > self.max_entries:
                _, old = buckets.popitem(last=False)  # its held tokens are forgone (under-admission)
                if old.debt and not old.inflight:
                    self.limiter.refill(old)  # but what it admitted on credit is still charged
        else:
            buckets.move_to_end(key)
        return b

    def sweep(self, now: float, limit: int = 1000) -> int:
        """Forget buckets idle for `idle_ttl` with nothing in flight or owed."""
        drop = []
        for i, (key, b) in enumerate(self._buckets.items()):
            if i >= limit or now - b.last_used < self.idle_ttl:
                break
            if not b.inflight and b.debt == 0:
                drop.append(key)
        for key in drop:
            del self._buckets[key]
        return len(drop)

    def __len__(self) -> int:
        return len(self._buckets) if self._single is None else 1


class RedisLimiter:
    """Per worker: the Redis client, batched refills, health, counters."""

    def __init__(self, config: ClusterConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.prefix = config.key_prefix.encode("utf-8")
        self.client = Redis.from_url(
            config.redis, socket_timeout=config.timeout, socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, decode_responses=False)
        self.sha = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()
        self._load_script = True  # with the first batch, and again after a NOSCRIPT
        self.up = True
        self.fail_closed = config.failure_mode == "closed"
        self._next_probe = 0.0
        self._probe: asyncio.Task | None = None
        self._pending: list[LeasedBucket] = []
        self._flight: asyncio.Task | None = None
        self._scheduled = False
        self.limits: list[LeasedLimit] = []
        self.stats = {"redis_calls": 0, "redis_errors": 0, "leased_tokens": 0,
                      "failed_open": 0, "failed_closed": 0}

    def limit(self, name: str, rate: float, burst: int, policy: str, keyed: bool) -> LeasedLimit:
        lim = LeasedLimit(self, name, rate, burst, policy, keyed)
        self.limits.append(lim)
        return lim

    # ------------------------------------------------------------------ request path
    def when_down(self, now: float) -> float:
        if self._probe is None and now >= self._next_probe:
            self._next_probe = now + self.config.retry_interval
            self._probe = self.loop.create_task(self._run_probe())
        if self.fail_closed:
            self.stats["failed_closed"] += 1
            return UNAVAILABLE
        self.stats["failed_open"] += 1
        return 0.0

    def refill(self, bucket: LeasedBucket) -> None:
        bucket.inflight = True
        self._pending.append(bucket)
        if not self._scheduled and self._flight is None:
            self._scheduled = True
            self.loop.call_soon(self._send)

    # ------------------------------------------------------------------ off the request path
    def _send(self) -> None:
        self._scheduled = False
        if self._flight is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._flight = self.loop.create_task(self._run(batch))

    async def _run(self, batch: list[LeasedBucket]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            loading = self._load_script
            if loading:  # in the same round trip as the calls that need it
                pipe.script_load(TAKE_SCRIPT)
            for b in batch:
                b.sent = b.debt
                lim = b.limit
                pipe.evalsha(self.sha, 1, b.rkey, repr(lim.rate), lim.burst, lim.lease, b.sent)
            self.stats["redis_calls"] += 1
            replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.config.timeout)
            if loading:
                if isinstance(replies[0], Exception):
                    raise replies[0]
                self._load_script = False
                replies = replies[1:]
        except REDIS_ERRORS as exc:
            for b in batch:
                b.failed()
            self._down(exc)
        except BaseException:
            for b in batch:
                b.failed()
            raise
        else:
            now = time.monotonic()
            for b, reply in zip(batch, replies, strict=False):
                if isinstance(reply, NoScriptError):  # Redis restarted: load it and retry
                    b.failed()
                    self._load_script = True
                    self.refill(b)
                    continue
                try:
                    if isinstance(reply, Exception):
                        raise reply
                    granted, level = int(reply[0]), float(reply[1])
                except (RedisError, ValueError, TypeError, IndexError) as exc:
                    b.failed()  # this bucket only (say, a key of the wrong type); the rest go on
                    self.stats["redis_errors"] += 1
                    log.warning("redis refused a throttle update for %r: %s", b.rkey, exc)
                    continue
                self.stats["leased_tokens"] += granted
                b.answered(now, granted, level)
        finally:
            self._flight = None
            if self._pending:
                self._send()

    def _down(self, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        if self.up:
            self.up = False
            log.warning("redis %s unreachable (%s): throttles fail %s until it answers",
                        self.config.redis, exc.__class__.__name__ + (f": {exc}" if str(exc) else ""),
                        self.config.failure_mode)
        self._next_probe = time.monotonic() + self.config.retry_interval

    async def _run_probe(self) -> None:
        try:
            await asyncio.wait_for(self.client.ping(), self.config.timeout)
        except REDIS_ERRORS as exc:
            self._down(exc)
        else:
            self.up = True
            log.warning("redis %s answers again: cluster throttles resume", self.config.redis)
        finally:
            self._probe = None

    def sweep(self, now: float) -> None:
        for lim in self.limits:
            lim.sweep(now)

    def telemetry(self) -> dict[str, Any]:
        return {"redis": self.config.redis, "up": self.up, **self.stats,
                "buckets": sum(len(lim) for lim in self.limits)}

    async def close(self) -> None:
        for task in (self._flight, self._probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.client.aclose()


# ---------------------------------------------------------------------- quotas
def _quota_key(prefix: bytes, period: str, key_id: str) -> bytes:
    return prefix + b"q:" + period.encode() + b":" + key_id.encode("utf-8", "surrogatepass")


class RedisQuotaStore:
    """`quota.QuotaStore`'s role with Redis as the store (see "Quotas in Redis")."""

    def __init__(self, limiter: RedisLimiter, periods: list[QuotaPeriod]) -> None:
        self.limiter = limiter
        self.client = limiter.client
        self.prefix = limiter.prefix
        self.periods = periods
        self.counter = QuotaCounter(periods[0] if periods else QuotaPeriod("DAY"))
        self.flushes = 0
        self._unsent: tuple[str, dict] | None = None  # (flush id, deltas) not yet acknowledged

    async def aload(self) -> int:
        """Read every key's count in the current periods (SCAN; at start)."""
        now = time.time()
        totals: dict[tuple[str, str], int] = {}
        for period in {p.period_key(now) for p in self.periods}:
            head = self.prefix + b"q:" + period.encode() + b":"
            async for batch in _scan_values(self.client, head):
                for rkey, value in batch:
                    totals[(rkey[len(head):].decode("utf-8", "surrogatepass"), period)] = int(value)
        self.counter.observe(now)
        self.counter.apply_totals(totals)
        return len(totals)

    async def aflush(self, now: float | None = None) -> int:
        """Send this worker's admissions (one atomic, idempotent script call) and read back
        the totals of every key it knows in the live periods."""
        now = time.time() if now is None else now
        counter = self.counter
        counter.observe(now)
        if self._unsent is None:
            self._unsent = (os.urandom(8).hex(), counter.take_deltas())
        flush_id, deltas = self._unsent
        live = set(counter.live_periods())
        known = [k for k in counter.known_keys() if k[1] in live and k not in deltas]
        ends = {p.period_key(now): p.reset_at(now) for p in self.periods}
        order = list(deltas) + known
        keys = [self.prefix + b"qf:" + flush_id.encode()]
        keys += [_quota_key(self.prefix, k[1], k[0]) for k in order]
        args = [len(deltas)] + [deltas[k] for k in deltas]
        args += [max(1, int(ends.get(k[1], now) - now) + _RETENTION) for k in deltas]
        # A timed-out call may still have been applied: the batch is kept as it is, with
        # its id, and sent again until an answer comes; the script applies an id once.
        values = await asyncio.wait_for(self.client.eval(_QUOTA_SCRIPT, len(keys), *keys, *args),
                                        self.limiter.config.timeout * 4)
        self._unsent = None
        counter.apply_totals({k: int(v) for k, v in zip(order, values, strict=False)})
        self.flushes += 1
        return sum(deltas.values())

    def pending(self) -> int:
        """Admitted here and not yet in Redis (what a crash now would lose)."""
        return self.counter.pending() + (sum(self._unsent[1].values()) if self._unsent else 0)

    async def aclose(self) -> None:
        try:
            await self.aflush()
        except REDIS_ERRORS as exc:
            log.warning("quota counts not written to redis at stop (%s): %d requests unaccounted",
                        exc.__class__.__name__, self.pending())


async def _scan_values(client: Redis, head: bytes, batch: int = 1000):
    """(key, value) pairs of every key starting with `head`, in MGET batches."""
    keys: list[bytes] = []
    async for rkey in client.scan_iter(match=head + b"*", count=batch):
        keys.append(rkey)
        if len(keys) >= batch:
            yield [(k, v) for k, v in zip(keys, await client.mget(keys), strict=False) if v is not None]
            keys = []
    if keys:
        yield [(k, v) for k, v in zip(keys, await client.mget(keys), strict=False) if v is not None]


async def redis_usage(url: str, prefix: str, key_id: str | None = None) -> list[dict[str, Any]]:
    """Rows for `edgeplane usage` from Redis: key id, period, used."""
    client = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    head = prefix.encode("utf-8") + b"q:"
    rows = []
    try:
        async for batch in _scan_values(client, head):
            for rkey, value in batch:
                period, _, kid = rkey[len(head):].decode("utf-8", "surrogatepass").partition(":")
                if key_id is None or kid == key_id:
                    rows.append({"key_id": kid, "period": period, "used": int(value)})
    finally:
        await client.aclose()
    rows.sort(key=lambda r: (r["key_id"], r["period"]))
    return rows


MIN_LEASE = 4  # a client's first few back-to-back requests fit in the first round trip


def lease_tokens(burst: int, fraction: float) -> int:
    """How far one worker may run ahead of Redis on one bucket: ``fraction`` of the burst,
    but at least `MIN_LEASE` (or the whole burst if it is smaller), so that a client's
    first requests, sent back to back before Redis has answered, are not refused."""
    return max(min(burst, MIN_LEASE), int(math.floor(burst * fraction)))
