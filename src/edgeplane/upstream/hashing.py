"""Consistent hashing for sticky load balancing: `ring_hash` and `maglev` (sans-IO).

Owns `HashRing` and `Maglev`, built once per upstream from its targets and weights, and
`request_key(req, source)`, the bytes a request is hashed by: `$request.header.NAME`,
`$request.cookie.NAME`, `$request.path.NAME` (a route parameter) or
`$context.identity.sourceIp`.

- `HashRing` (Karger et al., Envoy's ring_hash): 160 points per unit of weight per
  endpoint on a 64-bit ring; a key goes to the first point at or after its hash.
- `Maglev` (Eisenbud et al., Envoy's maglev): a lookup table of 65,537 slots (a prime)
  filled from each endpoint's permutation, in proportion to its weight.

Invariants: the same key goes to the same endpoint on every worker and host (BLAKE2b,
not Python's salted `hash`). `pick(h, usable)` walks on (the ring to its next endpoint,
the table to its next slot) past endpoints that are not usable, so when an endpoint
leaves only its own keys move: measured in `tests/upstream/test_resilience.py` (every
moved key was on the endpoint that left).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from edgeplane.http.request import cookie, header

POINTS_PER_WEIGHT = 160
MAGLEV_SIZE = 65_537


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class HashRing:
    __slots__ = ("points", "owners")

    def __init__(self, names: Sequence[str], weights: Sequence[int]) -> None:
        ring = sorted((hash64(f"{name}#{k}".encode()), i) for i, name in enumerate(names)
                      for k in range(POINTS_PER_WEIGHT * max(weights[i], 0)))
        self.points = [h for h, _ in ring]
        self.owners = [i for _, i in ring]

    def pick(self, h: int, usable: Callable[[int], bool]) -> int:
        """The endpoint for hash `h`: its point's, or the next usable one's; -1: none."""
        n = len(self.points)
        if not n:
            return -1
        start = bisect.bisect_left(self.points, h) % n
        seen: set[int] = set()
        for k in range(n):
            owner = self.owners[(start + k) % n]
            if owner in seen:
                continue
            if usable(owner):
                return owner
            seen.add(owner)
            if len(seen) == len(set(self.owners)):
                break
        return -1


class Maglev:
    __slots__ = ("table",)

    def __init__(self, names: Sequence[str], weights: Sequence[int]) -> None:
        m = MAGLEV_SIZE
        live = [i for i, w in enumerate(weights) if w > 0]
        table = [-1] * m
        if live:
            offsets = {i: hash64(f"{names[i]}:offset".encode()) % m for i in live}
            skips = {i: hash64(f"{names[i]}:skip".encode()) % (m - 1) + 1 for i in live}
            nexts = dict.fromkeys(live, 0)
            top = max(weights[i] for i in live)
            credit = dict.fromkeys(live, 0.0)
            filled = 0
            while filled < m:
                for i in live:  # weighted: an endpoint takes a turn as its credit allows
                    credit[i] += weights[i] / top
                    if credit[i] < 1.0:
                        continue
                    credit[i] -= 1.0
                    while True:
                        slot = (offsets[i] + nexts[i] * skips[i]) % m
                        nexts[i] += 1
                        if table[slot] < 0:
                            table[slot] = i
                            filled += 1
                            break
                    if filled == m:
                        break
        self.table = table

    def pick(self, h: int, usable: Callable[[int], bool]) -> int:
        table = self.table
        m = len(table)
        slot = h % m
        for k in range(m):
            owner = table[(slot + k) % m]
            if owner >= 0 and usable(owner):
                return owner
            if k > 64 and owner < 0:
                break
        return -1


def request_key(req: Any, source: str, peer: str) -> bytes | None:
    """The bytes `req` is hashed by (see the module docstring), or None when it has none."""
    kind, _, name = source.partition(":")
    if kind == "header":
        return header(req, name.encode())
    if kind == "cookie":
        return cookie(req, name.encode())
    if kind == "path":
        value = (req.params or {}).get(name)
        return value if isinstance(value, bytes) else value.encode() if isinstance(value, str) else None
    if kind == "source_ip":
        return (req.client_ip or peer).encode()  # the client (after trusted_proxies), else the peer
    return None
