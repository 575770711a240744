"""A JWKS fetched from a URL and kept fresh off the request path.

Owns the current `KeySet` of one JWT authorizer whose `jwks.url` is set, the refresh
task, and its counters. Fetches go through the gateway's own upstream client
(`client.fetch` over a `pool.Upstream` made for the URL's host), bounded to 1,500 ms and
150,000 bytes as AWS bounds them. `jwks.RefreshPolicy` decides when: on its interval,
sooner or later as the response's Cache-Control max-age says, with backoff after a
failure, and at most once per `unknown_kid_interval` when a token names a kid that the
key set lacks (so key rotation works without a restart, and a flood of made-up kids
cannot hammer the issuer).

Invariants:
- `keyset()` never awaits and never fails: it returns the last good key set (None
  before the first successful fetch, which makes every token 401).
- A failed refresh keeps the last good keys; it is logged and counted. A served set that
  fails the key-set hygiene checks (`jwks.JwksRefused`: repeated kid, ROCA key, mixed
  symmetric/asymmetric keys without the opt-out) is such a failure: it is never adopted,
  and the warning says which kids and why.
- At most one fetch is in flight; `close()` cancels it and the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from edgeplane.config.model import PoolConfig, UpstreamConfig
from edgeplane.policies.jwt.jwks import (
    MAX_JWKS_BYTES,
    JwksError,
    JwksRefused,
    KeySet,
    RefreshPolicy,
    cache_control_max_age,
    parse_jwks,
)
from edgeplane.upstream.client import FetchError, fetch, header_value, split_url
from edgeplane.upstream.cluster import Upstream

log = logging.getLogger("edgeplane.jwks")

FETCH_TIMEOUT = 1.5


class JwksSource:
    __slots__ = ("name", "url", "target", "path", "policy", "upstream", "allow_mixed_key_types",
                 "_keys", "_task", "_wake", "fetches", "failures", "last_error")

    def __init__(self, name: str, url: str, refresh: float, loop: asyncio.AbstractEventLoop,
                 *, allow_mixed_key_types: bool = False) -> None:
        self.name = name
        self.url = url
        self.allow_mixed_key_types = allow_mixed_key_types
        self.target, self.path = split_url(url)
        self.policy = RefreshPolicy(interval=refresh, min_interval=min(30.0, refresh))
        cfg = UpstreamConfig(name=f"jwks:{name}", targets=(self.target,),
                             pool=PoolConfig(max_connections=2, max_idle=1, connect_timeout=FETCH_TIMEOUT))
        self.upstream = Upstream(cfg, loop)
        self._keys: KeySet | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.fetches = 0
        self.failures = 0
        self.last_error: str | None = None

    def keyset(self) -> KeySet | None:
        return self._keys

    def has_keys(self) -> bool:
        """Whether a key set was fetched (else no token can be verified: the authorizer
        cannot decide, as opposed to refusing a bad token)."""
        return bool(self._keys)

    def unknown_kid(self) -> None:
        """A token named a kid we lack: refresh soon, if the policy allows it now."""
        if self.policy.unknown_kid(time.monotonic()):
            self._wake.set()

    async def start(self) -> None:
        """First fetch (bounded), then the refresh loop in the background."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def refresh(self) -> bool:
        now = time.monotonic()
        self.policy.begin(now)
        self.fetches += 1
        try:
            status, headers, body = await fetch(
                self.upstream.pick(), "GET", self.path, headers={"accept": "application/json"},
                timeout=FETCH_TIMEOUT, max_bytes=MAX_JWKS_BYTES)
            if status != 200:
                raise FetchError(f"status {status}")
            keys = parse_jwks(body, allow_mixed_key_types=self.allow_mixed_key_types)
        except (FetchError, JwksError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            retry = self.policy.on_failure(time.monotonic())
            # A refused set is the issuer's problem, not the network's: say so, and why.
            what = "refused the served key set" if isinstance(exc, JwksRefused) else "refresh failed"
            log.warning("JWKS %s (%s): %s: %s; keeping %s; retry in %.0fs",
                        self.url, self.name, what, exc,
                        f"{len(self._keys)} keys" if self._keys else "no keys",
                        max(0.0, retry - time.monotonic()))
            return False
        for reason in keys.errors:
            log.warning("JWKS %s (%s): skipped a key: %s", self.url, self.name, reason)
        max_age = cache_control_max_age(header_value(headers, b"cache-control"))
        self.policy.on_success(time.monotonic(), max_age)
        if self._keys is None or keys.version != self._keys.version:
            log.info("JWKS %s (%s): %d keys (kids: %s)", self.url, self.name, len(keys),
                     ", ".join(sorted(k for k in keys.kids if k)) or "-")
        self._keys = keys
        self.last_error = None
        return True

    async def _run(self) -> None:
        while True:
            delay = self.policy.delay(time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.0))
            except TimeoutError:
                pass
            self._wake.clear()
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.upstream.close()

    def telemetry(self) -> dict[str, Any]:
        return {"url": self.url, "keys": len(self._keys) if self._keys else 0,
                "fetches": self.fetches, "failures": self.failures, "last_error": self.last_error}
