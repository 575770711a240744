"""Recording the native framers (sans-IO) for the twin tests: every callback a framer
makes, in order, and how it stopped (tests/http/test_native_framer.py,
tests/upstream/test_response_framer.py)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from edgeplane.http.chunked import HttpParserError, HttpParserUpgrade


class Trace:
    """The callbacks of either framer: `on_head`'s arguments are kept as given, the
    header list as a tuple (its items must be bytes pairs)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_message_begin(self) -> None:
        self.calls.append(("begin",))

    def on_head(self, *args: Any) -> None:
        headers = next(a for a in args if isinstance(a, list))
        assert all(type(n) is bytes and type(v) is bytes for n, v in headers)
        self.calls.append(("head", *(tuple(a) if a is headers else a for a in args)))

    def on_body(self, chunk: bytes) -> None:
        assert type(chunk) is bytes
        self.calls.append(("body", chunk))

    def on_message_complete(self) -> None:
        self.calls.append(("complete",))


def mutate(rng: random.Random, seed: bytes, pieces: Sequence[bytes], most: int) -> bytes:
    """`seed` with 1 to `most` random edits: a piece inserted, or 1-3 bytes replaced by a
    piece or deleted."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, most)):
        at = rng.randrange(len(data) + 1)
        op = rng.random()
        if op < 0.45:
            data[at:at] = rng.choice(pieces)
        elif at < len(data):
            data[at : at + rng.randint(1, 3)] = rng.choice(pieces) if op < 0.75 else b""
    return bytes(data)


def run(cls: Any, data: bytes, cuts: tuple[int, ...], max_head: int,
        getters: Callable[[Any], tuple]) -> tuple[list, object]:
    """Feed `data` split at `cuts` to a new `cls(Trace(), max_head)`: its calls, and how it
    stopped: ("upgrade", args), (error type, message), or `getters(framer)` when the
    bytes ran out."""
    trace = Trace()
    framer = cls(trace, max_head)
    bounds = [0, *cuts, len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            framer.feed_data(data[a:b])
    except HttpParserUpgrade as exc:
        return trace.calls, ("upgrade", exc.args)
    except HttpParserError as exc:
        return trace.calls, (type(exc).__name__, str(exc))
    return trace.calls, getters(framer)
