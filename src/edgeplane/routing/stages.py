"""Which stage a request is for: a custom domain's mapping, or the first path segment.

Owns `StageSelector`, made by `build_snapshot` for a config with `stages` (one compiled
`Snapshot` per stage). `select(req)` finds the stage, strips what named it from
`req.path` (the stage segment, or the domain's base path; kept in `req.base_path`, as
`$context.path` shows the path the client sent), sets `req.stage`, and returns
the stage's snapshot, or None (404 `{"message":"Not Found"}`).

Order, as API mappings then invoke URLs work in Amazon API Gateway:
1. the Host has a `domains` mapping: its stage, when the path is under its base path;
2. `stage_routing: base_path`: the first path segment names the stage (`/prod/users/7`
   is `/users/7` on `prod`);
3. otherwise the `$default` stage, if there is one, at the root.
"""

from __future__ import annotations

from typing import Any

from edgeplane.config.model import StagesConfig


class StageSelector:
    __slots__ = ("snapshots", "by_segment", "domains", "default")

    def __init__(self, cfg: StagesConfig, snapshots: dict[str, Any]) -> None:
        self.snapshots = snapshots
        self.by_segment = {name.encode(): (name, snap) for name, snap in snapshots.items()} \
            if cfg.routing == "base_path" else {}
        self.domains = {d.host.encode(): (d.stage, b"/" + d.base_path.encode() if d.base_path else b"",
                                          snapshots[d.stage]) for d in cfg.domains}
        self.default = ("$default", snapshots["$default"]) if "$default" in snapshots else None

    def select(self, req: Any) -> Any:
        path = req.path
        if self.domains and req.host is not None:
            host = req.host.lower()
            if b":" in host and host[:1] != b"[":
                host = host[: host.rindex(b":")]
            found = self.domains.get(host.rstrip(b"."))
            if found is not None:
                name, base, snapshot = found
                if base and not (path == base or path.startswith(base + b"/")):
                    return None
                req.path = path[len(base):] or b"/"
                req.base_path, req.stage = base, name
                return snapshot
        if self.by_segment:
            end = path.find(b"/", 1)
            segment = path[1:] if end < 0 else path[1:end]
            named = self.by_segment.get(segment)
            if named is not None:
                req.path = b"/" if end < 0 else path[end:]
                req.base_path, req.stage = path[:end] if end > 0 else path, named[0]
                return named[1]
        if self.default is not None:
            req.stage = "$default"
            return self.default[1]
        return None
