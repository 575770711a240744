"""Weighted choice: nginx's smooth weighted round robin (sans-IO).

Owns `SmoothWeighted`, which spreads picks over members in proportion to their weights
and as evenly as possible in time (weights 5, 1, 1 give a a b a c a a, never a a a a a
b c). It is used for the targets of an upstream (`targets: [{url, weight}]`) and for
the upstreams of a route's `split` (blue/green, `Split`).

Invariants:
- Over any whole cycle of `sum(weights)` picks among the same usable members, each is
  picked exactly `weight` times: the spread is exact, not statistical.
- A member with weight 0 is never picked (a drained target). A member the caller says
  is unusable (a target that just failed to connect) is skipped for that pick, and the
  others share its turn.
- `reweight` (a reload that changes the weights) keeps the members and restarts the
  cycle; nothing else is reset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class SmoothWeighted:
    __slots__ = ("weights", "current")

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self.current = [0] * len(self.weights)

    def pick(self, usable: Callable[[int], bool] | None = None) -> int:
        """The index of the next member, or -1 when no member may be picked."""
        weights, current = self.weights, self.current
        best = -1
        total = 0
        for i, weight in enumerate(weights):
            if weight <= 0 or (usable is not None and not usable(i)):
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best >= 0:
            current[best] -= total
        return best

    def reweight(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self.current = [0] * len(self.weights)


def uniform(weights: Sequence[int]) -> bool:
    """Whether plain round robin does the same (every weight equal and positive)."""
    return not weights or (weights[0] > 0 and all(w == weights[0] for w in weights))


class Split:
    """A route's `split` (blue/green): each request goes to an upstream picked by weight,
    then to one of that upstream's targets. An upstream none of whose targets that take
    requests connected within the past second is skipped while another can take it.
    Looks like an `Upstream` to the proxy (`pick()`, `name`)."""

    __slots__ = ("upstreams", "weighted", "name")

    def __init__(self, upstreams: Sequence[Any], weights: Sequence[int]) -> None:
        self.upstreams = list(upstreams)
        # The cycle goes on across reloads while the split and its first upstream stay
        # (a reload of anything else must not restart a 99/1 split before the 1 came).
        key = (*(u.name for u in self.upstreams), *weights)
        found = self.upstreams[0].splits.get(key)
        if found is None:
            found = self.upstreams[0].splits[key] = SmoothWeighted(weights)
        self.weighted = found
        self.name = "|".join(u.name for u in self.upstreams)

    def pick(self, exclude: tuple[Any, ...] = (), req: Any = None, peer: str = "") -> Any:
        upstreams = self.upstreams
        now = upstreams[0].loop.time()
        i = self.weighted.pick(lambda i: upstreams[i].available(now))
        if i < 0:
            i = max(self.weighted.pick(), 0)
        return upstreams[i].pick(exclude, req, peer)
