"""Token-bucket throttling core (sans-IO): buckets, per-client bucket maps, the AWS-ordered
chain, and the RateLimit / Retry-After header lines.

This module owns the *arithmetic* of throttling on one worker. It never reads a clock,
never locks, never awaits and never touches sockets: every call takes ``now``, a reading
of a monotonic clock in seconds (``time.monotonic()`` in production, a plain float in the
tests). Wiring into the request path, the 429 body (``{"message":"Too Many Requests"}``,
owned by ``responses``), config validation messages, quotas and cross-worker / Redis
sharing live elsewhere.

API
---
- ``TokenBucket(rate, burst, policy="default")`` -- ``rate`` tokens/s (finite, > 0),
  ``burst`` tokens of capacity (int >= 1). Starts full.

  - ``take(now, n=1) -> float``: 0.0 when the ``n`` tokens were taken, else the seconds
    until they will be available (nothing is taken). ``n > burst`` can never succeed and
    returns ``math.inf``.
  - ``remaining(now) -> int``: whole tokens available now (0..burst).
  - ``reset_after(now) -> float``: seconds until the bucket is full again.

- ``BucketMap(rate, burst, max_entries=100_000, idle_ttl=60.0, policy="default")`` --
  one ``TokenBucket`` per client key (``str`` or ``bytes``; ``None`` is a legal key and is
  meant as the one shared bucket of requests whose client key could not be resolved).

  - ``bucket(key) -> TokenBucket`` (created full on first sight, marked most recently
    used), ``take(now, key, n=1) -> float`` as ``TokenBucket.take``.
  - ``sweep(now, limit=None) -> int``: drops buckets idle for at least ``idle_ttl``
    *and* full again; returns how many were dropped.
  - ``len(map)`` is the number of live buckets.

- ``ThrottleChain(route=None, server=None)`` with ``check(now, plan=None, plan_key=None,
  route_key=None, n=1) -> ThrottleResult``. Each level is a ``TokenBucket`` (shared) or a
  ``BucketMap`` (per client) or ``None`` (no limit). The usage-plan level is passed per
  call because it depends on the request's API key.
- ``LevelChain(route=None, server=None)``: the same ``check`` over any bucket with the
  *level interface* (``wait(now)``, ``spend(now)``, ``state(now)``, ``_policy``): shared
  memory across workers (`shared_limits`, `shared_keys`) and Redis leases across hosts
  (`cluster`). A level may answer ``UNAVAILABLE`` (its store is down and fails closed);
  the chain then refuses with that as ``retry_after``. `ThrottleChain` is the same
  algorithm inlined for in-process buckets (~0.9 µs cheaper per 3-level check); the tests
  run every chain case against both.
- ``ThrottleResult`` (``__slots__``): ``allowed``, ``retry_after`` (float seconds, 0.0
  when allowed), and for the most restrictive level ``limit`` (its burst), ``remaining``,
  ``reset`` (float seconds until full), ``window`` (int seconds) and ``policy`` (name);
  all four are ``None`` when the chain has no level.
- ``ratelimit_headers(result) -> bytes`` and ``retry_after_header(seconds) -> bytes``:
  complete lowercase header lines, each ending in CRLF.

Invariants
----------
1. **Exact bucket arithmetic.** ``tokens = min(burst, tokens + elapsed * rate)`` then a
   take of ``n`` succeeds iff ``tokens >= n`` (within 1e-9 of a token, so float rounding
   of ``elapsed * rate`` never refuses a token that is due). Over any interval of length
   ``T`` starting from a full bucket at most ``burst + rate * T`` tokens are granted.
2. **Clock going backwards** (or standing still) counts as no elapsed time: no token is
   minted from the step, and the bucket re-bases on the new reading, so refill resumes at
   the normal rate from there -- a client is never locked out for the size of the jump.
   (A clock oscillating back and forth therefore has only its forward steps counted.)
3. **Retry-After is honest:** a refused ``take`` returns exactly the time until ``n``
   tokens will have accrued, assuming nobody else takes from the bucket meanwhile.
4. **Bounded memory:** a ``BucketMap`` never holds more than ``max_entries`` buckets; on
   overflow the least recently used bucket is evicted (O(1), ``OrderedDict``), so a
   client rotating keys cannot grow memory past the cap. Evicting a non-full bucket
   forgives its debt, so size the cap above the number of concurrently active clients.
   ``sweep`` only drops full buckets, which is lossless (a re-created bucket starts full).
5. **Check-then-take:** the chain refills and checks every level first and takes from
   all of them only if all allow. A refused request consumes nothing at any level.
6. **Order as AWS:** usage plan (per API key), then route (shared or per client), then
   the server-wide level. On refusal ``retry_after`` is the largest wait over the
   refusing levels (the time until *all* of them would allow).
7. **Most restrictive level** for the headers: the level with the fewest whole tokens
   remaining after this request (ties: the longer reset, then the earlier level). On a
   refusal it is the refusing level with the longest wait.

Headers (draft-ietf-httpapi-ratelimit-headers-08, structured fields)
--------------------------------------------------------------------
::

    ratelimit-policy: "<policy>";q=<burst>;w=<window>
    ratelimit: "<policy>";r=<remaining>;t=<reset>

``q`` is the bucket size; ``w`` is the time, in whole seconds rounded up and at least 1,
that the rate needs to refill an empty bucket (``ceil(burst / rate)``). A token bucket has
no fixed window, so this is the closest honest reading: ``q`` requests may be sent at once,
and the full ``q`` is available again ``w`` seconds after the bucket was emptied. ``r`` is
whole tokens remaining after this request; ``t`` is whole seconds (rounded up) until the
bucket is full again. Retry-After is integer seconds, rounded up, at least 1, capped at
2147483647 (RFC 9110 delta-seconds).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

__all__ = [
    "TokenBucket",
    "BucketMap",
    "ThrottleChain",
    "LevelChain",
    "ThrottleResult",
    "Policy",
    "UNAVAILABLE",
    "ratelimit_headers",
    "retry_after_header",
]

_EPS = 1e-9  # tolerance in tokens for float rounding of elapsed * rate
_MAX_DELTA = 2147483647  # RFC 9110 delta-seconds: recipients handle at least 2**31
# A level's `wait` when its store (Redis) is down and the limit fails closed: the chain
# refuses with this as `retry_after`, and the stage answers 503 instead of 429.
UNAVAILABLE = -1.0


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ValueError(f"rate must be a number of requests per second (got {rate!r})")
    rate = float(rate)
    if not math.isfinite(rate) or rate <= 0.0:
        raise ValueError(f"rate must be a finite number > 0 (got {rate!r})")
    return rate


def _check_burst(burst) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int):
        raise ValueError(f"burst must be an integer (got {burst!r})")
    if burst < 1:
        raise ValueError(f"burst must be >= 1 (got {burst!r})")
    return burst


class Policy:
    """What a level advertises; shared by every bucket of a `BucketMap`."""

    __slots__ = ("name", "limit", "window", "sf_name", "policy_line")

    def __init__(self, name: str, rate: float, burst: int) -> None:
        if not isinstance(name, str) or not name or any(not (" " <= c <= "~") for c in name):
            raise ValueError(f"policy name must be non-empty printable ASCII (got {name!r})")
        self.name = name
        self.limit = burst
        w = burst / rate
        self.window = 1 if w <= 1.0 else min(_MAX_DELTA, math.ceil(w))
        self.sf_name = b'"' + name.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'
        self.policy_line = b"ratelimit-policy: %s;q=%d;w=%d\r\n" % (self.sf_name, burst, self.window)


class TokenBucket:
    """One token bucket. See the module docstring for the contract."""

    __slots__ = ("rate", "burst", "_tokens", "_last", "_policy")

    def __init__(self, rate: float, burst: int, policy: str = "default") -> None:
        self.rate = _check_rate(rate)
        self.burst = _check_burst(burst)
        self._tokens = float(self.burst)
        self._last = -math.inf  # first reading only ever tops up an already full bucket
        self._policy = Policy(policy, self.rate, self.burst)

    @classmethod
    def _fresh(cls, rate: float, burst: int, policy: Policy) -> TokenBucket:
        # Fast constructor for BucketMap misses: arguments already validated.
        b = cls.__new__(cls)
        b.rate = rate
        b.burst = burst
        b._tokens = float(burst)
        b._last = -math.inf
        b._policy = policy
        return b

    def _refill(self, now: float) -> float:
        elapsed = now - self._last
        self._last = now  # re-base even when the clock went backwards (invariant 2)
        tokens = self._tokens
        if elapsed > 0.0 and tokens < self.burst:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = float(self.burst)
            self._tokens = tokens
        return tokens

    def take(self, now: float, n: int = 1) -> float:
        tokens = self._refill(now)
        if tokens + _EPS >= n:
            self._tokens = tokens - n
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - tokens) / self.rate

    def remaining(self, now: float) -> int:
        tokens = self._refill(now)
        return int(tokens + _EPS) if tokens > 0.0 else 0

    # The level interface of `LevelChain`.
    def wait(self, now: float) -> float:
        tokens = self._refill(now)
        return 0.0 if tokens + _EPS >= 1.0 else (1.0 - tokens) / self.rate

    def spend(self, now: float) -> tuple[int, float]:
        tokens = self._refill(now) - 1.0
        self._tokens = tokens
        return (int(tokens + _EPS) if tokens > 0.0 else 0), (self.burst - tokens) / self.rate

    def state(self, now: float) -> tuple[int, float]:
        tokens = self._refill(now)
        return (int(tokens + _EPS) if tokens > 0.0 else 0), (self.burst - tokens) / self.rate

    def reset_after(self, now: float) -> float:
        tokens = self._refill(now)
        deficit = self.burst - tokens
        return deficit / self.rate if deficit > 0.0 else 0.0

    @property
    def policy(self) -> str:
        return self._policy.name

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate!r}, burst={self.burst!r}, tokens={self._tokens!r})"


class BucketMap:
    """Per-client token buckets with an LRU cap and an idle sweep."""

    __slots__ = ("rate", "burst", "max_entries", "idle_ttl", "_buckets", "_policy", "evictions")

    def __init__(
        self,
        rate: float,
        burst: int,
        max_entries: int = 100_000,
        idle_ttl: float = 60.0,
        policy: str = "default",
    ) -> None:
        self.rate = _check_rate(rate)
        self.burst = _check_burst(burst)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1 (got {max_entries!r})")
        if (
            isinstance(idle_ttl, bool)
            or not isinstance(idle_ttl, (int, float))
            or not math.isfinite(idle_ttl)
            or idle_ttl < 0
        ):
            raise ValueError(f"idle_ttl must be a finite number of seconds >= 0 (got {idle_ttl!r})")
        self.max_entries = max_entries
        self.idle_ttl = float(idle_ttl)
        self._buckets: OrderedDict = OrderedDict()
        self._policy = Policy(policy, self.rate, self.burst)
        self.evictions = 0  # LRU evictions at the cap, for metrics

    def bucket(self, key) -> TokenBucket:
        buckets = self._buckets
        b = buckets.get(key)
        if b is None:
            b = TokenBucket._fresh(self.rate, self.burst, self._policy)
            buckets[key] = b
            if len(buckets) > self.max_entries:
                buckets.popitem(last=False)
                self.evictions += 1
        else:
            buckets.move_to_end(key)
        return b

    def take(self, now: float, key, n: int = 1) -> float:
        return self.bucket(key).take(now, n)

    def sweep(self, now: float, limit: int | None = None) -> int:
        """Drop buckets idle for >= idle_ttl that are full again. O(examined), oldest first.

        Stops at the first bucket used within ``idle_ttl`` (every later one is more recent).
        ``limit`` bounds how many buckets one call examines, for a per-tick budget.
        """
        buckets = self._buckets
        ttl = self.idle_ttl
        drop = []
        examined = 0
        for key, b in buckets.items():
            if limit is not None and examined >= limit:
                break
            examined += 1
            last = b._last
            if now - last < ttl:
                break
            # Full at `now`? Computed without mutating the bucket.
            if b._tokens + (now - last) * b.rate + _EPS >= b.burst:
                drop.append(key)
        for key in drop:
            del buckets[key]
        return len(drop)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key) -> bool:
        return key in self._buckets

    @property
    def policy(self) -> str:
        return self._policy.name


class ThrottleResult:
    """Outcome of one `ThrottleChain.check`. ``limit``/``window``/``policy`` come from the
    most restrictive level (``None`` when the chain has no level)."""

    __slots__ = ("allowed", "retry_after", "remaining", "reset", "_pol")

    def __init__(self, allowed, retry_after, remaining, reset, pol) -> None:
        self.allowed = allowed
        self.retry_after = retry_after
        self.remaining = remaining
        self.reset = reset
        self._pol = pol

    @property
    def limit(self) -> int | None:
        return None if self._pol is None else self._pol.limit

    @property
    def window(self) -> int | None:
        return None if self._pol is None else self._pol.window

    @property
    def policy(self) -> str | None:
        return None if self._pol is None else self._pol.name

    def __repr__(self) -> str:
        return (
            f"ThrottleResult(allowed={self.allowed}, retry_after={self.retry_after!r}, "
            f"limit={self.limit}, remaining={self.remaining}, reset={self.reset!r}, "
            f"window={self.window}, policy={self.policy!r})"
        )


class ThrottleChain:
    """The AWS-ordered levels of one route: usage plan (per call), route, server."""

    __slots__ = ("_route_map", "_route_bucket", "_server")

    def __init__(self, route: TokenBucket | BucketMap | None = None, server: TokenBucket | None = None) -> None:
        if route is not None and not isinstance(route, (TokenBucket, BucketMap)):
            raise TypeError("route level must be a TokenBucket, a BucketMap or None")
        if server is not None and not isinstance(server, TokenBucket):
            raise TypeError("server level must be a TokenBucket or None")
        self._route_map = route if isinstance(route, BucketMap) else None
        self._route_bucket = route if isinstance(route, TokenBucket) else None
        self._server = server

    def check(self, now: float, plan=None, plan_key=None, route_key=None, n: int = 1) -> ThrottleResult:
        # Resolve the levels, in AWS order.
        if plan is not None and plan.__class__ is BucketMap:
            plan = plan.bucket(plan_key)
        route = self._route_bucket
        if route is None and self._route_map is not None:
            route = self._route_map.bucket(route_key)
        server = self._server

        # Phase 1: refill and check every level; nothing is taken yet.
        worst = None  # set on the first level that refuses
        wait = 0.0
        for b in (plan, route, server):
            if b is None:
                continue
            # Inlined TokenBucket._refill (hot path).
            tokens = b._tokens
            elapsed = now - b._last
            b._last = now
            if elapsed > 0.0 and tokens < b.burst:
                tokens += elapsed * b.rate
                if tokens > b.burst:
                    tokens = float(b.burst)
                b._tokens = tokens
            if tokens + _EPS < n:
                w = math.inf if n > b.burst else (n - tokens) / b.rate
                if worst is None or w > wait:
                    wait = w
                    worst = b
        if worst is not None:
            return ThrottleResult(False, wait, 0, (worst.burst - worst._tokens) / worst.rate, worst._policy)

        # Phase 2: all allow -> take from all; track the most restrictive level.
        best = None
        best_rem = 0
        best_reset = 0.0
        for b in (plan, route, server):
            if b is None:
                continue
            tokens = b._tokens - n
            b._tokens = tokens
            rem = int(tokens + _EPS) if tokens > 0.0 else 0
            reset = (b.burst - tokens) / b.rate
            if best is None or rem < best_rem or (rem == best_rem and reset > best_reset):
                best = b
                best_rem = rem
                best_reset = reset
        if best is None:
            return ThrottleResult(True, 0.0, None, None, None)
        return ThrottleResult(True, 0.0, best_rem, best_reset, best._policy)


def _ceil_seconds(seconds: float, minimum: int) -> int:
    if seconds != seconds or seconds >= _MAX_DELTA:  # NaN or too large / inf
        return _MAX_DELTA
    s = math.ceil(seconds - 1e-9)  # 2.0000000001 (float noise) is 2, not 3
    return s if s > minimum else minimum


def ratelimit_headers(result: ThrottleResult) -> bytes:
    """``ratelimit-policy`` and ``ratelimit`` lines (draft-08 form, see module docstring).

    Returns b"" when the chain had no level (nothing to advertise).
    """
    pol = result._pol
    if pol is None:
        return b""
    return pol.policy_line + b"ratelimit: %s;r=%d;t=%d\r\n" % (
        pol.sf_name,
        result.remaining,
        _ceil_seconds(result.reset, 0),
    )


def retry_after_header(seconds: float) -> bytes:
    """``retry-after: <int>`` line: seconds rounded up, at least 1, at most 2**31-1."""
    return b"retry-after: %d\r\n" % _ceil_seconds(seconds, 1)


class LevelChain:
    """`ThrottleChain`'s contract over any bucket that offers the *level interface*, for
    limits whose state lives outside this process (shared memory across workers, Redis
    leases across hosts) or that mix kinds:

    - ``wait(now) -> float``: 0.0 when one token could be taken now (nothing is taken),
      else the seconds until one could; ``UNAVAILABLE`` when the level's store is down
      and configured to fail closed.
    - ``spend(now) -> (remaining, reset)``: take one token *unconditionally* -- the chain
      has decided -- and return whole tokens left and seconds until full. Unconditional
      matters for shared state: another worker may take the last token between this
      ``wait`` and ``spend``; the admission must still be counted, or such races add up
      instead of being paid back by the refill.
    - ``state(now) -> (remaining, reset)``: the same reading without taking (refusals).
    - ``_policy``: the `Policy` it advertises.

    ``route`` is a bucket, or a keyed limit (anything with ``bucket(key)``) for per-client
    levels; ``plan`` (per call) is a keyed limit looked up by ``plan_key``. Order, the
    check-then-take rule and the choice of the most restrictive level are
    `ThrottleChain`'s (invariants 5-7). `TokenBucket` offers the interface too;
    `ThrottleChain` is the same algorithm inlined for in-process buckets, the hot path of
    a single worker."""

    __slots__ = ("_route", "_route_keyed", "_server")

    def __init__(self, route: Any = None, server: Any = None) -> None:
        self._route_keyed = route is not None and hasattr(route, "bucket")
        self._route = route
        self._server = server

    def check(self, now: float, plan: Any = None, plan_key: Any = None, route_key: Any = None) -> ThrottleResult:
        levels = []
        if plan is not None:
            levels.append(plan.bucket(plan_key) if hasattr(plan, "bucket") else plan)
        route = self._route
        if route is not None:
            levels.append(route.bucket(route_key) if self._route_keyed else route)
        if self._server is not None:
            levels.append(self._server)
        worst = None
        wait = 0.0
        for b in levels:
            w = b.wait(now)
            if w != 0.0 and (worst is None or w > wait or w == UNAVAILABLE):
                wait, worst = w, b
                if w == UNAVAILABLE:
                    break
        if worst is not None:
            if wait == UNAVAILABLE:
                return ThrottleResult(False, UNAVAILABLE, 0, 0.0, worst._policy)
            rem, reset = worst.state(now)
            return ThrottleResult(False, wait, 0, reset, worst._policy)
        best = None
        best_rem = 0
        best_reset = 0.0
        for b in levels:
            rem, reset = b.spend(now)
            if best is None or rem < best_rem or (rem == best_rem and reset > best_reset):
                best, best_rem, best_reset = b, rem, reset
        if best is None:
            return ThrottleResult(True, 0.0, None, None, None)
        return ThrottleResult(True, 0.0, best_rem, best_reset, best._policy)
