"""Which slot of the shared-memory tables holds which limit, across reloads (`workers: N`).

Owns the limit indices of the supervisor's two tables: `shared_limits.SharedLimitTable`
("plain": the server-wide, route and WebSocket API buckets) and
`shared_keys.SharedKeyTable` ("keyed": per-client route throttles and usage plans).

A limit is named by its identity (`identities`): its level, where it applies and its
settings, rate and burst included. An identity keeps its slot across reloads, so its
counts carry over; a new or changed limit gets a free slot and starts full, as
`LocalLimits` does in one process.

Invariants:
- Only the supervisor assigns (`SlotMap.initial` at start, `advance` on each reload) and
  writes the map into the workers' spec; a worker started without one (embedded tables,
  tests) uses `SlotMap.initial(config)`, the supervisor's own start. Every worker thus
  agrees on every index.
- A slot never holds two live identities. A slot freed by a reload is reused only after
  `QUARANTINE_GENERATIONS` more reloads and `QUARANTINE_SECONDS`: a request routed on an
  older snapshot may still take a token from it (its throttle check comes after its
  authorizer), and the supervisor resets its cells before reuse (`reset` on each table).
  Slots never used are taken first, so reuse is rare; a limit that comes back (the
  same identity, removed by an earlier reload) takes its own slot back, counts included.
- The capacity is fixed when the tables are created: the start's count plus
  `PLAIN_HEADROOM` plain slots, and max(`KEYED_MIN`, twice the start's count) keyed ones (a
  keyed slot holds 16,384 client rows per worker). A reload that needs more is refused,
  naming the way out: a restart or `serve --takeover`, which lays the tables out afresh.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from edgeplane.config.stages import views

if TYPE_CHECKING:
    from edgeplane.config.model import Config

__all__ = ["SlotMap", "SlotsExhausted", "identities", "route_identity", "plan_identity", "ws_identity"]

PLAIN_HEADROOM = 1024  # 16 bytes per worker each: 32 KiB with 2 workers
KEYED_MIN = 8
QUARANTINE_GENERATIONS = 2
QUARANTINE_SECONDS = 120.0


class SlotsExhausted(ValueError):
    """A reload needs more slots than the tables were created with."""


def _plans(config: Config) -> dict[str, Any]:
    plans: dict[str, Any] = config.policies.get("usage_plans") or {}
    return plans


def route_identity(rc: Any, t: Any) -> tuple[str, str]:
    """(kind, identity) of a throttled route's limit."""
    if t.key is None:
        return "plain", f"route {rc.limit_key} {t!r}"
    return "keyed", f"client {rc.limit_key} {t!r}"


def plan_identity(name: str, route_key: str | None, t: Any) -> str:
    return f"plan {name} {route_key or ''} {t!r}"


def ws_identity(name: str, rate: float) -> str:
    return f"ws {name} {rate!r}"


def identities(config: Config) -> list[tuple[str, str]]:
    """Every shared limit of `config` as (kind, identity), in config order."""
    out: list[tuple[str, str]] = []
    t = config.policies.get("throttle")
    if t is not None:
        out.append(("plain", f"server {t!r}"))
    for rc in (rc for _, _, c in views(config) for rc in c.routes):
        rt = rc.policies.get("throttle")
        if rt is not None:
            out.append(route_identity(rc, rt))
    for name, plan in _plans(config).items():
        if plan.throttle is not None:
            out.append(("keyed", plan_identity(name, None, plan.throttle)))
        for key, pt in plan.route_throttles.items():
            out.append(("keyed", plan_identity(name, key, pt)))
    seen = set()
    for view in (c for _, _, c in views(config)) if config.stages is not None else (config,):
        for name, api in view.websocket_apis.items():
            identity = ws_identity(name, api.limits.connections_per_second)
            if identity not in seen:
                seen.add(identity)
                out.append(("plain", identity))
    return out


@dataclasses.dataclass
class SlotMap:
    """identity -> index per kind, with what the supervisor needs to advance it."""

    slots: dict[str, dict[str, int]]  # kind -> identity -> index
    capacity: dict[str, int]
    unused: dict[str, int] = dataclasses.field(default_factory=lambda: {"plain": 0, "keyed": 0})
    # kind -> [(index, generation freed, time freed, the identity it held)]
    freed: dict[str, list[tuple[int, int, float, str]]] = dataclasses.field(
        default_factory=lambda: {"plain": [], "keyed": []})
    generation: int = 0

    @classmethod
    def initial(cls, config: Config) -> SlotMap:
        slots: dict[str, dict[str, int]] = {"plain": {}, "keyed": {}}
        for kind, identity in identities(config):
            slots[kind][identity] = len(slots[kind])
        capacity = {"plain": len(slots["plain"]) + PLAIN_HEADROOM,
                    "keyed": max(KEYED_MIN, 2 * len(slots["keyed"]))}
        return cls(slots, capacity, {kind: len(s) for kind, s in slots.items()})

    def index(self, kind: str, identity: str) -> int:
        return self.slots[kind][identity]

    def advance(self, config: Config, now: float) -> tuple[SlotMap, list[tuple[str, int]]]:
        """The map for a reload to `config` at monotonic time `now`, and the reused
        slots the supervisor must reset before any worker sees the map. Nothing changes
        in `self`; SlotsExhausted when a kind runs out."""
        generation = self.generation + 1
        wanted = identities(config)
        slots: dict[str, dict[str, int]] = {"plain": {}, "keyed": {}}
        unused = dict(self.unused)
        freed = {kind: list(entries) for kind, entries in self.freed.items()}
        for kind, identity in wanted:  # unchanged identities keep their slots (and counts)
            if identity in self.slots[kind]:
                slots[kind][identity] = self.slots[kind][identity]
        for kind, old in self.slots.items():  # dropped or changed: quarantined
            freed[kind] += [(index, generation, now, identity) for identity, index in old.items()
                            if identity not in slots[kind]]
        reset: list[tuple[str, int]] = []
        for kind, identity in wanted:
            if identity in slots[kind]:
                continue
            own = next((e for e in freed[kind] if e[3] == identity), None)
            if own is not None:  # the same limit back (removed a moment ago): its own slot, as it was
                freed[kind].remove(own)
                slots[kind][identity] = own[0]
                continue
            if unused[kind] < self.capacity[kind]:
                slots[kind][identity] = unused[kind]
                unused[kind] += 1
                continue
            ready = next((e for e in freed[kind] if generation - e[1] >= QUARANTINE_GENERATIONS
                          and now - e[2] >= QUARANTINE_SECONDS), None)
            if ready is None:
                raise SlotsExhausted(
                    f"throttle: the shared-memory tables of `workers: N` hold {self.capacity[kind]} "
                    f"{'per-client' if kind == 'keyed' else 'plain'} limits, and changed limits leave "
                    f"their slot unused for {QUARANTINE_SECONDS:.0f}s and {QUARANTINE_GENERATIONS} reloads; "
                    "this reload needs one more: restart, or `edgeplane serve --takeover` "
                    "(either lays the tables out afresh)")
            freed[kind].remove(ready)
            slots[kind][identity] = ready[0]
            reset.append((kind, ready[0]))
        return SlotMap(slots, dict(self.capacity), unused, freed, generation), reset

    def for_workers(self) -> dict[str, dict[str, int]]:
        """What the workers' spec carries (JSON)."""
        return self.slots

    @classmethod
    def from_spec(cls, slots: dict[str, dict[str, int]]) -> SlotMap:
        return cls({"plain": dict(slots.get("plain", {})), "keyed": dict(slots.get("keyed", {}))},
                   capacity={})
