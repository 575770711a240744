"""A stage's canary: which requests the canary side serves (`stages.NAME.canary`).

Owns `Canary`, one per stage with a canary, holding the canary side's compiled
snapshot (the stage's API with the canary's `variable_overrides`). `takes(req)` decides
per request:

1. the force header, when configured (`force_header`): `always` or `never` decides;
2. a sticky key (`sticky: {header: NAME}` or `{cookie: NAME}`), when the request has
   one: the key's hash decides, so one user stays on one side (and moves only when
   `percent` changes enough to move its bucket);
3. otherwise a random draw with probability `percent` / 100.

Invariants: the decision costs a dict lookup and a draw or a hash; a request with no
canary on its stage pays nothing here. The hash is CRC-32, stable across workers,
hosts and restarts, so a key's side does not depend on which worker took it.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from edgeplane.http.request import cookie, header

_random = random.random


class Canary:
    __slots__ = ("percent", "snapshot", "sticky_header", "sticky_cookie", "force_header", "_threshold")

    def __init__(self, cfg: Any, snapshot: Any) -> None:
        self.percent = cfg.percent
        self.snapshot = snapshot
        self.sticky_header = cfg.sticky_header.lower().encode() if cfg.sticky_header else None
        self.sticky_cookie = cfg.sticky_cookie.encode() if cfg.sticky_cookie else None
        self.force_header = cfg.force_header.lower().encode() if cfg.force_header else None
        self._threshold = int(cfg.percent * 100)  # of 10,000 buckets

    def takes(self, req: Any) -> bool:
        if self.force_header is not None:
            forced = header(req, self.force_header)
            if forced is not None:
                forced = forced.strip().lower()
                if forced == b"always":
                    return True
                if forced == b"never":
                    return False
        key = None
        if self.sticky_header is not None:
            key = header(req, self.sticky_header)
        elif self.sticky_cookie is not None:
            key = cookie(req, self.sticky_cookie)
        if key:
            return zlib.crc32(key) % 10_000 < self._threshold
        return _random() * 100 < self.percent
