"""Where a route's entries live in process: a byte-bounded LRU, plus the entry format.

Owns `Entry` (a stored response: status, header lines, body, and its clock), `VaryMarker`
(the request headers a stored response varies on), `MemoryStore` and `CacheStats`.

Invariants:
- `used` never exceeds `capacity` after `put` returns: the least recently used items
  are evicted first, and an item larger than the capacity is refused;
- every item is also indexed by its request path, so an admin flush of one path removes
  every variant (query, identity, Vary) of it and nothing else;
- sizes count the body, the header bytes, the key and a fixed overhead per item, so the
  bound holds for many small entries too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

ITEM_OVERHEAD = 200  # bytes: the objects around an item (a conservative estimate)


class Entry:
    """One stored response. `head` is the header lines as sent (`name: value\\r\\n`...),
    without framing, hop-by-hop headers or the request id."""

    __slots__ = ("status", "head", "body", "stored_at", "fresh_until", "stale_until", "size")

    def __init__(self, status: int, head: bytes, body: bytes, stored_at: float, fresh_until: float,
                 stale_until: float) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.stored_at = stored_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.size = len(head) + len(body) + ITEM_OVERHEAD


class VaryMarker:
    """Stored under the primary key when the response named `Vary`: the request header
    names its variants are keyed by."""

    __slots__ = ("names", "stale_until", "size")

    def __init__(self, names: tuple[bytes, ...], stale_until: float) -> None:
        self.names = names
        self.stale_until = stale_until
        self.size = sum(map(len, names)) + ITEM_OVERHEAD


Item = Entry | VaryMarker


class CacheStats:
    """Counters of one route's cache (the metrics and `/stats`)."""

    __slots__ = ("hits", "misses", "refreshes", "stale", "coalesced", "stored", "not_stored", "evictions",
                 "errors")

    def __init__(self) -> None:
        self.hits = self.misses = self.refreshes = self.stale = self.coalesced = 0
        self.stored = self.not_stored = self.evictions = self.errors = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class MemoryStore:
    """One route's entries in this worker."""

    sync = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[bytes, Item] = OrderedDict()
        self.by_path: dict[bytes, set[bytes]] = {}
        self.paths: dict[bytes, bytes] = {}  # key -> its path
        self.used = 0
        self.stats = CacheStats()
        self.inflight: dict[bytes, Any] = {}  # key -> its `stage.Fill` in progress

    def put_entry(self, key: bytes, entry: Entry, path: bytes) -> None:
        self.put(key, path, entry)

    def put_variant(self, key: bytes, variant_key: bytes, names: tuple[bytes, ...], entry: Entry,
                    path: bytes) -> None:
        marker = self.items.get(key)
        if type(marker) is not VaryMarker or marker.names != names or marker.stale_until < entry.stale_until:
            self.put(key, path, VaryMarker(names, entry.stale_until))
        self.put(variant_key, path, entry)

    def get(self, key: bytes) -> Item | None:
        item = self.items.get(key)
        if item is not None:
            self.items.move_to_end(key)
        return item

    def put(self, key: bytes, path: bytes, item: Item) -> bool:
        size = item.size + len(key)
        if size > self.capacity:
            return False
        self.delete(key)
        items = self.items
        while self.used + size > self.capacity and items:
            self.delete(next(iter(items)))
            self.stats.evictions += 1
        items[key] = item
        self.used += size
        self.paths[key] = path
        self.by_path.setdefault(path, set()).add(key)
        return True

    def delete(self, key: bytes) -> bool:
        item = self.items.pop(key, None)
        if item is None:
            return False
        self.used -= item.size + len(key)
        path = self.paths.pop(key)
        keys = self.by_path.get(path)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_path[path]
        return True

    def flush(self, path: bytes | None = None) -> int:
        """Remove every item, or every item of one request path; how many were removed."""
        if path is None:
            n = len(self.items)
            self.items.clear()
            self.by_path.clear()
            self.paths.clear()
            self.used = 0
            return n
        return sum(self.delete(key) for key in list(self.by_path.get(path, ())))

    def telemetry(self) -> dict[str, Any]:
        return {"backend": "memory", "entries": len(self.items), "bytes": self.used, "capacity": self.capacity,
                **self.stats.as_dict()}
