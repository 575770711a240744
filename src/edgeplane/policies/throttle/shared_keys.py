"""Cross-process *per-client* token buckets without locks, in fixed memory.

Owns
----
- `SharedKeyTable`: `n_limits` keyed limits (one token bucket per client key: an IP, an
  API key id, a header value) shared by `n_workers` worker processes through one
  shared-memory segment (a file in /dev/shm, mapped with mmap). The supervisor
  `create()`s it before spawning workers, each worker `attach()`es with its own index,
  the supervisor `unlink()`s it at shutdown -- the lifecycle of
  `shared_limits.SharedLimitTable`, whose segment helpers (name check and path, create
  with the free-space check, map, worker-slot claim, index and `limit()` argument checks) and
  worker and limit caps this module imports.
- `SharedKeyedLimit`: one keyed limit seen from one worker: `take(now, key, n=1)`,
  `tokens(now, key)`, `remaining(now, key)`, and `bucket(key)`, a light
  `SharedKeyBucket` view (hashes the key once; created per request) with the interface
  of `shared_limits.SharedBucket`: `take(now, n=1)`, `tokens(now)`, `remaining(now)`,
  `rate`, `burst` (and the level interface `wait(now)`, `state(now)`, `_policy`).

Nothing here locks, awaits or makes a system call on the check path: a check hashes the
key (blake2b), reads one row of 3*N aligned 64-bit cells (plus the N tags once more) and
writes at most four cells of the calling worker's own column.

Design
------
The arithmetic is `shared_limits`' (read its docstring): for a bucket of rate r and size
b, A(t) = r*(t - epoch) - C(t) with C the tokens consumed, and
tokens(t) = b + A(t) - max_{s <= t} A(s); C = sum_i C_i and max A = max_i M_i split into
cells with a single writer each (worker i writes only C_i and M_i).

Keys are mapped to a fixed number of slots per limit. The tag of a key is
blake2b(key bytes, digest_size=8, key=salt) as a little-endian uint64 (0 is replaced by
1: 0 marks an empty cell); a str key is hashed as its UTF-8 bytes (so "a" and b"a" are
the same client); None -- the one shared bucket of requests whose client key could not be
resolved -- gets blake2b(b"", key=salt, person=b"edgeplane:none"), distinct from every
str/bytes key. The 16-byte salt is random, written in the header at `create`, so every
process computes the same tags (Python's `hash()` is randomised per process) while a
client cannot choose keys that land in a given slot. slot = tag % slots_per_limit.

A slot is one row of 3*N cells: tag_0..tag_{N-1} (uint64), C_0..C_{N-1} (int64),
M_0..M_{N-1} (float64); worker i owns column i (tag_i, C_i, M_i), which holds the state
of *one* key at a time, the one tagged tag_i. A check of key tag h by worker i reads the
row (one `struct.unpack_from`, tags first), then the N tags again, and counts worker j
only when tag_j == h in both reads:

    S = sum of C_j, top = max of M_j over those j;   A = r*(now - epoch) - S
    full = A > top  (then top = A);                  tokens = b + A - top

If tokens >= n it admits. When column i already holds h it stores M_i = A (only if full)
then C_i += n. Otherwise it *claims* column i for h, in this order:
tag_i = 0 (unpublish), M_i = top (a past maximum of h's A, so the cap's memory survives
even if the other workers' columns are evicted later), C_i = n, tag_i = h (publish).
A refused check writes nothing, so a flood of refused requests never evicts anyone; a
read-only `tokens` never writes.

Consequences:

- Collision in one worker: two keys in the same slot admitted by the same worker share
  its column; the later one evicts the earlier, whose consumption and maximum *in that
  worker's column* are forgotten (an LRU eviction, like `throttle.BucketMap` at its
  cap). Forgetting only ever raises the evicted key's level (lower S, lower max): it is
  lenient, and it never throttles a client for another client's traffic -- a key is
  charged only with cells tagged with its own tag. Size `slots_per_limit` above the
  number of clients a worker sees concurrently per limit: with K active keys per worker
  a given key shares its slot with another with probability ~ K/slots.
- Different workers' columns hold different keys side by side: key g in worker 0 and key
  h in worker 1 of the same slot are both exact.
- Fixed memory: n_limits * slots_per_limit * n_workers * 24 bytes (plus a 64-byte header
  and the owner-pid table, 8*N bytes rounded up to 64), sparse in tmpfs: a page costs
  memory only once a key in it is admitted (16,384 slots x 4 workers = 1.5 MiB a limit).
  A client rotating keys cannot grow memory, and each new key it sends evicts a given
  key's state from a given worker with probability 1/slots_per_limit (it cannot aim at
  a slot: the salt is secret); rotating keys already gives it a fresh bucket per key, as
  with any per-client limit.
- Two distinct keys with equal 64-bit tags share one bucket (probability 2^-64 per pair
  of keys active at once in the same slot).

Invariants
----------
- Single writer per cell: only worker i writes tag_i, C_i and M_i. A restarted worker
  re-attaches to the same index and continues from its predecessor's columns (they live
  in shared memory): a crash returns no tokens. `attach` refuses an index whose recorded
  owner pid is alive. (As in `shared_limits`, the pid check and the write are not
  atomic: the supervisor must not attach two processes to one index at once.)
- All workers pass the same (rate, burst) for a limit index for the table's life; the
  epoch and the salt are fixed at `create`. Clocks are CLOCK_MONOTONIC, as in
  `shared_limits` (a clock going backwards only removes tokens).
- Publication order: a column is unpublished (tag 0) before its counters are rewritten
  and republished after; a reader reads the tags before the counters and again after.
  Aligned 8-byte loads and stores are single-copy atomic on x86-64 and aarch64 (struct's
  native '@' format and memoryview both copy a cell with one 8-byte memcpy); the order of
  the stores and of the loads is program order on x86-64 (TSO). On aarch64 it is not
  architecturally guaranteed (no barriers from Python), which only widens the race below.
- Memory: the segment is sparse; `create` refuses a table larger than the free space of
  /dev/shm (touching an unbacked page of a full tmpfs would SIGBUS the worker).

Accuracy bound
--------------
For one key, as for `SharedBucket`: between a worker's read of the row and its own
write, each of the other N-1 workers can admit on the same stale view, so for any window
[s, t] the tokens granted to a key are at most

    b + r*(t - s) + (N - 1) per race window, not cumulative (counted in C at once)

plus what collisions forgive: the consumption and maximum held in an evicted column. The
first check of a key in several workers at once is such a race (each sees it full).

Re-tagging race: a reader counts column j only when it saw tag_j == h before and after
reading C_j and M_j, so it never credits another key's counter to h unless column j was
re-tagged away from h *and back to h* within that one read (two collisions of the same
slot in worker j during ~0.3 us -- only a reader preempted mid-read can see it; it then
may charge h with the other key's C_j / M_j, a few tokens, once). A reader that saw h
only once ignores column j (lenient: that column is being evicted or claimed anyway).

Measured (2-CPU host, CPython 3.11, N = 4 unless said; rate 1,000/s, burst 100):

- `.venv/bin/python tests/test_shared_keys.py 10 4`: 4 worker processes hammer one
  client key for 10 s (500,000-720,000 checks/s in all, each through a fresh
  `bucket(key)` view): 10,099-10,100 admitted of 10,100.0 expected (burst + rate*T, T
  from the workers' own first and last checks). A second key hammered by worker 0 alone
  in the same loop gets exactly what a private in-process `throttle.TokenBucket` fed the
  same checks gets (10,097 = 10,097); with 8 workers (`... 10 8`): 10,090 of 10,089.6,
  key B 9,793 = 9,793 (burst + rate*T says 10,032: with 8 processes on 2 CPUs worker 0
  stalls past burst/rate = 0.1 s and B refills to its cap -- any bucket loses that).
- `.venv/bin/python -m pytest -q tests/test_shared_keys.py` (2 s run, whole file ~4 s):
  2,099-2,100 of 2,100.0 over 10 runs; key B equal to the private bucket every time.
- At 100,000/s (`... 2 4 100000`): 199,904-199,949 of 200,100 (-0.1%, never above; at
  ~2 us a check, 4 processes sharing 2 CPUs at times check that key less often than
  100,000/s and the bucket reaches its cap).
- Per check (`test_per_check_cost`, key held by all 4 workers): take 1.15-1.4 us
  admitted, 0.75 us refused, tokens 1.0 us; `bucket(key)` (hash + view) 0.93 us;
  `limit.take(now, key)` (hash + check) 2.0 us. A request through one level of
  `throttle.LevelChain` (bucket + wait + take + state) costs ~4 us.

Precision: A is a float64 relative to the epoch, as in `shared_limits`.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING, cast

from edgeplane.policies.throttle.shared_limits import (
    MAX_LIMITS,
    MAX_WORKERS,
    _check_index,
    _claim_worker,
    _create_segment,
    _existing_view,
    _map_segment,
    _Segment,
)

if TYPE_CHECKING:
    from edgeplane.policies.throttle.buckets import Policy

__all__ = ["SharedKeyTable", "SharedKeyedLimit", "SharedKeyBucket", "MAX_SLOTS"]

MAX_SLOTS = 1 << 24

_MAGIC = int.from_bytes(b"EPSHKEY1", "little")  # detects a foreign or stale file
_VERSION = 1
# header: magic Q, version Q, n_workers Q, n_limits Q, slots Q, epoch d, salt 16s = 64 bytes
_HEADER = struct.Struct("<QQQQQd16s")
_HEADER_SIZE = 64
_NEG_INF = -math.inf
_INF = math.inf


def _layout(n_workers: int, n_limits: int, slots: int) -> tuple[int, int, int]:
    """(offset of the owner table, offset of the rows, total size) in bytes. Row
    (limit k, slot s) is at rows + (k*slots + s) * 24*N: N tags, N counters, N maxima."""
    owners = _HEADER_SIZE
    rows = owners + (8 * n_workers + 63) // 64 * 64
    size = rows + 24 * n_workers * slots * n_limits
    return owners, rows, size


def _check_count(what: str, v, top: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
        raise ValueError(f"{what} must be 1..{top}, got {v!r}")


class SharedKeyBucket:
    """The bucket of one client key in a `SharedKeyedLimit`: the `SharedBucket`
    interface, with the key hashed once at creation (cheap: make one per request)."""

    __slots__ = ("_lim", "_tag", "_off", "rate", "burst", "_policy")
    _lim: SharedKeyedLimit
    _tag: int
    _off: int
    rate: float
    burst: float
    _policy: Policy | None

    def take(self, now: float, n: int = 1) -> float:
        """0.0 when `n` tokens were taken at `now`, else seconds to wait (inf if n > burst)."""
        return self._lim._take(self._tag, self._off, now, n)

    def tokens(self, now: float) -> float:
        """The key's level at `now` (negative only after a race over-admitted)."""
        return self._lim._tokens(self._tag, self._off, now)

    def remaining(self, now: float) -> int:
        """Whole tokens left at `now` (0..burst), for RateLimit headers."""
        t = self._lim._tokens(self._tag, self._off, now)
        return int(t) if t > 0 else 0

    # The level interface of `throttle.LevelChain` (as `SharedBucket`'s).
    def wait(self, now: float) -> float:
        t = self._lim._tokens(self._tag, self._off, now)
        return 0.0 if t >= 1.0 else (1.0 - t) / self.rate

    def spend(self, now: float) -> tuple[int, float]:
        # Always counted, even when another worker took the last token since `wait`:
        # a race then shows as a negative level that the refill pays back.
        t = self._lim._take(self._tag, self._off, now, 1, True)
        return (int(t) if t > 0 else 0), max(0.0, (self.burst - t) / self.rate)

    def state(self, now: float) -> tuple[int, float]:
        t = self._lim._tokens(self._tag, self._off, now)
        return (int(t) if t > 0 else 0), max(0.0, (self.burst - t) / self.rate)

    def consumed(self) -> int:
        """Tokens consumed by this key as the workers' columns currently record it."""
        return self._lim._consumed(self._tag, self._off)


class SharedKeyedLimit:
    """One keyed limit of a `SharedKeyTable`, as seen by one worker. Not thread-safe
    within a worker (one event loop thread per worker is the intended use)."""

    __slots__ = ("index", "rate", "burst", "slots", "_policy", "_epoch", "_n", "_i",
                 "_buf", "_tq", "_cq", "_md", "_row", "_tags", "_base", "_rowsize", "tag")

    def __init__(self, table: SharedKeyTable, index: int, rate: float, burst: float) -> None:
        n = table.n_workers
        self.index = index
        self.rate = rate
        self.burst = burst
        self.slots = table.slots
        self._policy: Policy | None = None  # the `throttle.Policy` it advertises; set by whoever wires it
        self._epoch = table.epoch
        self._n = n
        self._i = cast(int, table.worker_index)  # not None: `SharedKeyTable.limit` refused that
        self._buf = table._buf          # bytes of the whole segment, for unpack_from
        self._tq = table._tq            # the same, as uint64 cells (tags)
        self._cq = table._cq            # as int64 cells (counters)
        self._md = table._md            # as float64 cells (maxima)
        self._row = table._row.unpack_from
        self._tags = table._tags.unpack_from
        self._rowsize = 24 * n
        self._base = table._rows + index * table.slots * self._rowsize
        self.tag = table.tag            # key -> 64-bit tag (`SharedKeyTable.tag`)

    # ------------------------------------------------------------------ keys
    def bucket(self, key: str | bytes | None = None) -> SharedKeyBucket:
        """The bucket of `key` (str, bytes or None = the unresolved clients' bucket)."""
        tag = self.tag(key)
        b = SharedKeyBucket.__new__(SharedKeyBucket)
        b._lim = self
        b._tag = tag
        b._off = self._base + tag % self.slots * self._rowsize
        b.rate = self.rate
        b.burst = self.burst
        b._policy = self._policy
        return b

    def take(self, now: float, key: str | bytes | None, n: int = 1) -> float:
        """`SharedBucket.take` for the bucket of `key`."""
        tag = self.tag(key)
        return self._take(tag, self._base + tag % self.slots * self._rowsize, now, n)

    def tokens(self, now: float, key: str | bytes | None) -> float:
        tag = self.tag(key)
        return self._tokens(tag, self._base + tag % self.slots * self._rowsize, now)

    def remaining(self, now: float, key: str | bytes | None) -> int:
        t = self.tokens(now, key)
        return int(t) if t > 0 else 0

    # ------------------------------------------------------------------ the check
    def _read(self, h: int, off: int) -> tuple[int, float]:
        """(S, top) for tag h: counters summed and maxima maxed over the columns tagged
        h in both reads of the tags (before and after the counters)."""
        v = self._row(self._buf, off)
        again = self._tags(self._buf, off)
        n = self._n
        s = 0
        top = _NEG_INF
        for j in range(n):
            if v[j] == h and again[j] == h:
                s += v[n + j]
                m = v[2 * n + j]
                if m > top:
                    top = m
        return s, top

    def _take(self, h: int, off: int, now: float, n: int, force: bool = False) -> float:
        """0.0 when `n` tokens were taken, else the wait (nothing taken). With `force`
        (the chain already decided: `SharedKeyBucket.spend`) always take, and return the
        level after taking."""
        # `_read`, inlined: this is the hot path
        v = self._row(self._buf, off)
        again = self._tags(self._buf, off)
        w = self._n
        s = 0
        top = _NEG_INF
        for j in range(w):
            if v[j] == h and again[j] == h:
                s += v[w + j]
                m = v[2 * w + j]
                if m > top:
                    top = m
        a = self.rate * (now - self._epoch) - s
        if a > top:                          # full: remember where the cap cut in
            top = a
            full = True
        else:
            full = False
        tokens = self.burst + a - top
        if tokens >= n or force:
            i = self._i
            cell = (off >> 3) + i
            if v[i] == h:                    # own column already holds this key
                if full:
                    self._md[cell + 2 * w] = a
                self._cq[cell + w] = v[w + i] + n     # after the maximum
            else:                            # claim the column: unpublish, fill, publish
                self._tq[cell] = 0
                self._md[cell + 2 * w] = top
                self._cq[cell + w] = n
                self._tq[cell] = h
            return tokens - n if force else 0.0
        if n > self.burst:
            return _INF
        return (n - tokens) / self.rate

    def _tokens(self, h: int, off: int, now: float) -> float:
        s, top = self._read(h, off)
        a = self.rate * (now - self._epoch) - s
        return self.burst + a - (a if a > top else top)

    def _consumed(self, h: int, off: int) -> int:
        return self._read(h, off)[0]


class SharedKeyTable(_Segment):
    """A shared-memory table of `n_limits` keyed limits for `n_workers` processes, each
    with `slots` slots per limit."""

    KIND = "shared key table"

    def __init__(self, name: str, mm: mmap.mmap, n_workers: int, n_limits: int, slots: int,
                 epoch: float, salt: bytes, worker_index: int | None) -> None:
        self.name = name
        self.n_workers = n_workers
        self.n_limits = n_limits
        self.slots = slots
        self.epoch = epoch
        self.worker_index = worker_index
        self._mm: mmap.mmap | None = mm
        self._buf = memoryview(mm)
        self._tq = self._buf.cast("Q")
        self._cq = self._buf.cast("q")
        self._md = self._buf.cast("d")
        # native '@' format: each 8-byte cell is copied with one aligned memcpy (the
        # standard '<' format assembles bytes one by one and could tear)
        self._row = struct.Struct(f"@{n_workers}Q{n_workers}q{n_workers}d")
        self._tags = struct.Struct(f"@{n_workers}Q")
        self._owners, self._rows, _ = _layout(n_workers, n_limits, slots)
        self._hasher = hashlib.blake2b(digest_size=8, key=salt)
        self._none_tag = int.from_bytes(hashlib.blake2b(
            digest_size=8, key=salt, person=b"edgeplane:none").digest(), "little") or 1
        self._limits: dict[int, SharedKeyedLimit] = {}

    def tag(self, key: str | bytes | None) -> int:
        """The key's 64-bit tag (1..2**64-1), identical in every process of the table;
        its slot in every limit is tag % slots."""
        if key is None:
            return self._none_tag
        h = self._hasher.copy()
        h.update(key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key)
        return int.from_bytes(h.digest(), "little") or 1

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, n_workers: int, n_limits: int, slots_per_limit: int = 16384,
               epoch: float | None = None) -> SharedKeyTable:
        """Supervisor side: create (exclusively, mode 0600) the segment, sparse and zeroed
        (every cell empty: every key starts with a full bucket). `epoch` defaults to
        `time.monotonic()`."""
        _check_count("n_workers", n_workers, MAX_WORKERS)
        _check_count("n_limits", n_limits, MAX_LIMITS)
        _check_count("slots_per_limit", slots_per_limit, MAX_SLOTS)
        epoch = time.monotonic() if epoch is None else float(epoch)
        _, _, size = _layout(n_workers, n_limits, slots_per_limit)
        salt = os.urandom(16)
        header = _HEADER.pack(0, _VERSION, n_workers, n_limits, slots_per_limit, epoch, salt)
        mm = _create_segment(name, size, header[8:], _MAGIC, "shared key table")
        return cls(name, mm, n_workers, n_limits, slots_per_limit, epoch, salt, None)

    @classmethod
    def attach(cls, name: str, worker_index: int) -> SharedKeyTable:
        """Worker side: map the segment the supervisor created and claim column
        `worker_index` (refused while another live process holds it)."""
        mm = _map_segment(name, _HEADER_SIZE, "shared key table")
        try:
            magic, version, n_workers, n_limits, slots, epoch, salt = _HEADER.unpack_from(mm, 0)
            if (magic != _MAGIC or version != _VERSION or not 1 <= n_workers <= MAX_WORKERS
                    or not 1 <= n_limits <= MAX_LIMITS or not 1 <= slots <= MAX_SLOTS
                    or _layout(n_workers, n_limits, slots)[2] != len(mm)):
                raise ValueError(f"shared key table {name!r} has an unknown layout")
            _check_index("worker_index", worker_index, n_workers)
        except BaseException:
            mm.close()
            raise
        table = cls(name, mm, n_workers, n_limits, slots, epoch, salt, worker_index)
        try:
            _claim_worker(table._cq, table._owners // 8 + worker_index, worker_index, name)
        except BaseException:
            table.close()
            raise
        return table

    def close(self) -> None:
        """Unmap (every limit and bucket of this table becomes unusable). Idempotent."""
        if self._mm is None:
            return
        self._limits.clear()
        for v in (self._tq, self._cq, self._md, self._buf):
            v.release()
        self._mm.close()
        self._mm = None


    def reset(self, limit_index: int) -> None:
        """Supervisor side: empty every row of limit `limit_index` (every key full again)
        before it is given to another limit (`slots.SlotMap`)."""
        if self.worker_index is not None or self._mm is None:
            raise RuntimeError("only the supervisor's open table resets a limit")
        _check_index("limit_index", limit_index, self.n_limits)
        size = 24 * self.n_workers * self.slots
        start = self._rows + limit_index * size
        self._buf[start:start + size] = bytes(size)

    # ------------------------------------------------------------------ limits
    def limit(self, limit_index: int, rate: float, burst: float) -> SharedKeyedLimit:
        """The keyed limit `limit_index` for this worker. Every worker must pass the same
        rate and burst for the same index."""
        old = _existing_view(self, self._limits, limit_index, rate, burst)
        if old is not None:
            return old
        lim = SharedKeyedLimit(self, limit_index, float(rate), float(burst))
        self._limits[limit_index] = lim
        return lim
