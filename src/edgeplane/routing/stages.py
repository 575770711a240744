"""Which stage a request is for: a custom domain's mapping, or the first path segment.

Owns `StageSelector`, made by `build_snapshot` for a config with `stages` (one compiled
`Snapshot` per stage). `select(req)` finds the stage, strips what named it from
`req.path` (the stage segment, or the domain's base path; the path as sent is kept in
`req.base_path`, which `$context.path` shows), sets `req.stage`, and returns
the stage's snapshot (its canary side's, for the requests its canary takes:
`routing.canary`, `req.canary`), or None (404 `{"message":"Not Found"}`).

Order, as API mappings then invoke URLs work in Amazon API Gateway:
1. the Host has a `domains` mapping: its stage, when the path is under its base path;
2. `stage_routing: base_path`: the first path segment names the stage (`/prod/users/7`
   is `/users/7` on `prod`);
3. otherwise the `$default` stage, if there is one, at the root.
"""

from __future__ import annotations

from typing import Any

from edgeplane.config.model import StagesConfig
from edgeplane.routing.canary import Canary


class StageSelector:
    __slots__ = ("snapshots", "by_segment", "domains", "default", "canaries")

    def __init__(self, cfg: StagesConfig, snapshots: dict[str, Any], canaries: dict[str, Canary] | None = None) -> None:
        self.snapshots = snapshots
        self.canaries = canaries or {}  # stage -> its canary side (`routing.canary`)
        # `$default` is served at the root only, never as /$default/...
        self.by_segment = {name.encode(): (name, snap) for name, snap in snapshots.items()
                           if name != "$default"} if cfg.routing == "base_path" else {}
        self.domains = {d.host.encode(): (d.stage, b"/" + d.base_path.encode() if d.base_path else b"",
                                          snapshots[d.stage]) for d in cfg.domains}
        self.default = ("$default", snapshots["$default"]) if "$default" in snapshots else None

    def select(self, req: Any) -> Any:
        snapshot = self._stage(req)
        if snapshot is not None and self.canaries:
            canary = self.canaries.get(req.stage)
            if canary is not None and canary.takes(req):
                req.canary = True
                return canary.snapshot
        return snapshot

    def _stage(self, req: Any) -> Any:
        path = req.path
        if self.domains and req.host is not None:
            host = req.host.lower()
            if host[:1] == b"[":  # an IPv6 literal, maybe with a port
                host = host[: host.find(b"]") + 1]
            elif b":" in host:
                host = host[: host.rindex(b":")]
            found = self.domains.get(host.rstrip(b"."))
            if found is not None:
                name, base, snapshot = found
                if base and not (path == base or path.startswith(base + b"/")):
                    req.stage = "-"
                    return None
                if base:
                    req.path, req.base_path = path[len(base):] or b"/", path
                req.stage = name
                return snapshot
        if self.by_segment:
            end = path.find(b"/", 1)
            segment = path[1:] if end < 0 else path[1:end]
            named = self.by_segment.get(segment)
            if named is not None:
                req.path, req.base_path = (b"/" if end < 0 else path[end:]), path
                req.stage = named[0]
                return named[1]
        if self.default is not None:
            req.stage = "$default"
            return self.default[1]
        req.stage = "-"  # no stage: logged as such
        return None
