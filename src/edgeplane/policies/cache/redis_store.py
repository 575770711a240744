"""A route's entries in Redis (`cache.backend: redis`): shared by every worker and host
of a cluster (`cluster.redis`, `cluster.key_prefix`).

Owns `RedisStore`: lookups as one GET (two when the response named `Vary`), stores and
flushes as Lua scripts, so the capacity is enforced in Redis itself.

Layout, under `PREFIXcache:{STORE}:` (one hash tag per route, so a store lives in one
slot): `e:HASH` the entries (with a PX expiry at the end of their stale window), `lru` a
sorted set of entry keys by store time, `sizes` a hash of their sizes, `used` their sum,
`p:HASH` the entry keys of one request path (for an admin flush), `paths` each entry
key's path set (so an eviction leaves no member behind: every structure is bounded by
the entries within the capacity).

Invariants: `used` stays at or under the capacity once a store script returns (the
oldest stored entries go first; expired ones count until they are reached, so the bound
is conservative); Redis being down or slow (`cluster.timeout`) makes a lookup a miss and
a store a no-op, counted and logged once per outage: the request is never failed for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from edgeplane.policies.cache.keys import variant
from edgeplane.policies.cache.store import CacheStats, Entry, VaryMarker

if TYPE_CHECKING:
    from edgeplane.http.protocol import HttpProtocol
    from edgeplane.http.request import Request

log = logging.getLogger("edgeplane.cache")

_ERRORS = (RedisError, OSError, TimeoutError, ValueError)

# KEYS: lru, the path's set, sizes, used, paths (entry key -> its path set);
# ARGV: blob, ttl ms, size, capacity, now ms, entry key, path-set ttl ms.
_PUT = """
local old = redis.call('HGET', KEYS[3], ARGV[6])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', ARGV[6], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('HSET', KEYS[5], ARGV[6], KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
local used = redis.call('INCRBY', KEYS[4], ARGV[3])
local evicted = 0
while used > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then break end
  local m = oldest[1]
  local size = tonumber(redis.call('HGET', KEYS[3], m) or '0')
  local set = redis.call('HGET', KEYS[5], m)
  if set then redis.call('SREM', set, m) end
  redis.call('ZREM', KEYS[1], m)
  redis.call('HDEL', KEYS[3], m)
  redis.call('HDEL', KEYS[5], m)
  redis.call('DEL', m)
  used = redis.call('DECRBY', KEYS[4], size)
  if m ~= ARGV[6] then evicted = evicted + 1 end
end
return evicted
"""

# KEYS: the path's set, lru, sizes, used, paths.
_FLUSH_PATH = """
local members = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, m in ipairs(members) do
  local size = redis.call('HGET', KEYS[3], m)
  if size then
    redis.call('DECRBY', KEYS[4], size)
    redis.call('HDEL', KEYS[3], m)
  end
  redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[5], m)
  n = n + redis.call('DEL', m)
end
redis.call('DEL', KEYS[1])
return n
"""


def _encode(item: Entry | VaryMarker) -> bytes:
    if isinstance(item, VaryMarker):
        meta: dict[str, Any] = {"v": [n.decode("latin-1") for n in item.names], "x": item.stale_until}
        return orjson.dumps(meta) + b"\n"
    meta = {"s": item.status, "h": item.head.decode("latin-1"), "t": item.stored_at, "f": item.fresh_until,
            "x": item.stale_until}
    return orjson.dumps(meta) + b"\n" + item.body


def _decode(raw: bytes | None) -> Entry | VaryMarker | None:
    if raw is None:
        return None
    meta_raw, _, body = raw.partition(b"\n")
    meta = orjson.loads(meta_raw)
    if "v" in meta:
        return VaryMarker(tuple(n.encode("latin-1") for n in meta["v"]), float(meta["x"]))
    return Entry(int(meta["s"]), meta["h"].encode("latin-1"), body, float(meta["t"]), float(meta["f"]),
                 float(meta["x"]))


class RedisStore:
    sync = False

    def __init__(self, client: Any, prefix: str, store_id: str, capacity: int, timeout: float,
                 tasks: set[asyncio.Task[Any]]) -> None:
        self.client = client
        self.base = f"{prefix}cache:{{{store_id}}}:".encode()
        self.capacity = capacity
        self.timeout = max(timeout, 0.05)
        self.tasks = tasks  # the runtime's: cancelled at stop
        self.stats = CacheStats()
        self.inflight: dict[bytes, Any] = {}
        self.down = False

    def _entry_key(self, key: bytes) -> bytes:
        return self.base + b"e:" + hashlib.blake2b(key, digest_size=16).hexdigest().encode()

    def _path_key(self, path: bytes) -> bytes:
        return self.base + b"p:" + hashlib.blake2b(path, digest_size=16).hexdigest().encode()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if not self.down:
            self.down = True
            log.warning("cache: redis %s failed (%s: %s); answering from the upstream until it is back",
                        what, type(exc).__name__, exc)

    def _up(self) -> None:
        if self.down:
            self.down = False
            log.info("cache: redis answers again")

    async def _get(self, key: bytes) -> Entry | VaryMarker | None:
        return _decode(await asyncio.wait_for(self.client.get(self._entry_key(key)), self.timeout))

    # -- the stage's side ---------------------------------------------------------------
    def lookup(self, stage: Any, proto: HttpProtocol, req: Request, key: bytes, no_store: bool,
               by_header: bool) -> None:
        self._spawn(self._lookup(stage, proto, req, key, no_store, by_header))

    async def _lookup(self, stage: Any, proto: HttpProtocol, req: Request, key: bytes, no_store: bool,
                      by_header: bool) -> None:
        item: Entry | VaryMarker | None = None
        primary = key
        try:
            item = await self._get(key)
            if isinstance(item, VaryMarker):
                key = variant(key, item.names, req)
                item = await self._get(key)
                if isinstance(item, VaryMarker):
                    item = None
            self._up()
        except _ERRORS as exc:
            self._failed("lookup", exc)
            item = None
        req.pending = False
        if proto._closed or req.responded or req is not proto._active:
            return
        try:
            result = stage.decide(proto, req, key, item, no_store, by_header, primary)
            if result is True:
                proto.resume_chain(req, req.route.stages.index(stage) + 1)
        except Exception as exc:  # the gateway's bug: 500, logged
            proto.internal_error(req, exc, f"the cache of route {req.route_key!r}")

    def put_entry(self, key: bytes, entry: Entry, path: bytes) -> None:
        self._spawn(self._put(self._entry_key(key), entry, path))

    def put_variant(self, key: bytes, variant_key: bytes, names: tuple[bytes, ...], entry: Entry,
                    path: bytes) -> None:
        async def both() -> None:
            await self._put(self._entry_key(key), VaryMarker(names, entry.stale_until), path)
            await self._put(self._entry_key(variant_key), entry, path)
        self._spawn(both())

    async def _put(self, member: bytes, item: Entry | VaryMarker, path: bytes) -> None:
        blob = _encode(item)
        size = len(blob) + len(member)
        if size > self.capacity:
            return
        ttl_ms = max(1, math.ceil((item.stale_until - time.time()) * 1000))
        base = self.base
        keys = [base + b"lru", self._path_key(path), base + b"sizes", base + b"used", base + b"paths"]
        args = [blob, ttl_ms, size, self.capacity, int(time.time() * 1000), member, ttl_ms]
        try:
            evicted = await asyncio.wait_for(self.client.eval(_PUT, len(keys), *keys, *args), self.timeout * 10)
            self.stats.evictions += int(evicted)
            self._up()
        except _ERRORS as exc:
            self._failed("store", exc)

    # -- admin --------------------------------------------------------------------------
    async def flush(self, path: bytes | None = None) -> int:
        base = self.base
        if path is not None:
            keys = [self._path_key(path), base + b"lru", base + b"sizes", base + b"used", base + b"paths"]
            return int(await asyncio.wait_for(self.client.eval(_FLUSH_PATH, len(keys), *keys), self.timeout * 50))
        n = 0
        async for found in self.client.scan_iter(match=base + b"*", count=500):
            n += int(found.startswith(base + b"e:"))
            await self.client.delete(found)
        return n

    def telemetry(self) -> dict[str, Any]:
        # (no capacity or sizes: the store is shared, and /stats sums what workers report)
        return {"backend": "redis", "redis_down": self.down, **self.stats.as_dict()}
