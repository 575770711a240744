"""Cross-process token buckets without locks: one limit for the whole server, not N x it.

Owns
----
- `SharedLimitTable`: a fixed table of up to `n_limits` token buckets shared by
  `n_workers` worker processes through one shared-memory segment (a file in /dev/shm,
  mapped with mmap). The supervisor `create()`s it before spawning workers and passes
  the name on (for example in the environment); each worker `attach()`es with its own
  worker index; the supervisor `unlink()`s it at shutdown.
- `SharedBucket`: one limit seen from one worker: `take(now)` and `remaining(now)`.
- The segment helpers `shared_keys` reuses: `_shm_path` (name check), `_create_segment`
  (exclusive 0600 create, refused beyond the free space of /dev/shm, magic written
  last), `_map_segment`, `_claim_worker` (the owner-pid slot), `_check_index` and
  `_check_limit` (argument checks), `_existing_view` (the opening of `bucket()`),
  `_pid_alive`.

Nothing here locks, awaits or makes a system call on the check path: a check reads
2*N aligned 64-bit cells and writes at most two cells of the calling worker's own slot.

Design
------
A token bucket (rate r, size b, full at the start) admits a request at time t when its
level is >= 1. Writing A(t) = r*(t - epoch) - C(t), where C(t) is the total number of
tokens consumed so far, the level of a capped bucket is

    tokens(t) = b + A(t) - max_{s <= t} A(s)

(the bucket is full at the last instant A reached its running maximum; every token
that would have overflowed the cap since then is lost, which is what the max
remembers). Both terms split into per-worker cells that have a single writer each:

- C(t) = sum_i C_i: worker i's cell C_i counts the tokens *it* consumed (int64).
- max_s A(s) = max_i M_i: worker i's cell M_i is the largest A it has observed
  (float64, initialised to -inf, so a bucket starts full at its first check). A rises
  only between consumptions, so the running maximum is reached just before some
  consumption or at "now"; every consumption is preceded by a check of the consuming
  worker, which records A in its own M_i first. Hence max_i M_i is the running max.

A check in worker i: S = sum(C), M = max(M_*), A = r*(now - epoch) - S; if A > M the
bucket is full and the worker stores M_i = A (only then: under overload a check writes
nothing but its own counter); tokens = b + A - max(M, A); if tokens >= n it stores
C_i += n (after M_i, so nobody sees the consumption without the maximum) and admits,
else it answers retry-after = (n - tokens) / r.

Invariants
----------
- Single writer per cell: only worker i writes C_i and M_i; C_i never decreases, M_i
  never decreases. A restarted worker re-attaches to the same index and continues from
  the cells its predecessor left (they live in shared memory), so a worker crash never
  returns tokens. `attach` refuses an index whose recorded owner pid is still alive.
- All workers use the same (rate, burst) for a given limit index while it is assigned
  (the supervisor assigns indexes, `slots.SlotMap`; it resets a slot, `reset`, before
  giving it to another limit); the epoch is fixed at `create`.
- Clocks are CLOCK_MONOTONIC (`time.monotonic()`), system-wide on Linux, so workers
  agree. A clock that goes backwards only lowers A, i.e. removes tokens: it can never
  let a flood through; it cannot lock a client out for longer than the jump.
- Aligned 8-byte loads and stores are single-copy atomic on x86-64 and aarch64, so a
  reader sees either the old or the new value of a cell, never a torn one.

Accuracy bound
--------------
Reads of other workers' cells are not atomic with this worker's write: between a
worker's read of the counters and its own increment, each of the other N-1 workers can
admit one request on the same stale view. Such over-admissions are *not cumulative*:
they are counted in C at once, so later checks see a negative level and wait for the
refill. For any window [s, t] the tokens granted are at most

    b + r*(t - s) + (N - 1)                       (N workers, one token per request)

(plus r times the clock skew between two workers' reads of the clock, microseconds).
The lag can also make a worker record a maximum up to N-1 too high while the bucket is
full, which loses at most N-1 tokens until the bucket refills. With 4 workers, rate
1,000/s and burst 100, a 10 s overload admits 10,100 within +3/-3 requests from this
design -- far inside the issue's +/-5% (+/-505).

Measured (real processes, `python tests/test_shared_limits.py 10 4`, 2-CPU host):
4 workers, 10 s overload at 1,000/s burst 100: 10,100 admitted of 10,100; 8 workers:
10,100; 2 s runs: 2,099-2,100 of 2,100 (the -1 is the window's end cutting the last
token); at 100,000/s: 200,097 of 200,100, never above. One `take` costs ~0.5 us with
N = 4 (CPython 3.11), admitted or refused; wired as two `throttle.LevelChain` levels
(route + server: `wait`, `spend`) ~2.9 us (benches/throttle_bench.py). Through the
gateway, 4 workers, 10 s: 10,106-10,110 of 10,100 at the upstream (benches/limit_accuracy.py).

Precision: A is a float64 relative to the table's epoch: at 1,000,000 tokens/s a table
a year old has A ~ 3e13, whose float spacing is ~0.004 token.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from edgeplane.policies.throttle.buckets import Policy

__all__ = ["SharedLimitTable", "SharedBucket", "MAX_WORKERS", "MAX_LIMITS"]

MAX_WORKERS = 64
MAX_LIMITS = 65536
SHM_DIR = "/dev/shm"

_MAGIC = int.from_bytes(b"EPSHLIM1", "little")  # detects a foreign or stale file
_VERSION = 1
# header: magic Q, version Q, n_workers Q, n_limits Q, epoch d, 3 x reserved Q = 64 bytes
_HEADER = struct.Struct("<QQQQdQQQ")
_HEADER_SIZE = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def _layout(n_workers: int, n_limits: int) -> tuple[int, int, int]:
    """(offset of the owner table, offset of the limit table, total size) in bytes.

    Limit k occupies 2*N cells: C_0..C_{N-1} (int64) then M_0..M_{N-1} (float64)."""
    owners = _HEADER_SIZE
    limits = owners + 8 * n_workers
    size = limits + 16 * n_workers * n_limits
    return owners, limits, size


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- segments
# The lifecycle helpers of a table segment, shared with `shared_keys`. A segment is a
# file in SHM_DIR: a header whose first 8 bytes are a magic number, then the body; `what`
# names the table kind in error messages ("shared limit table", "shared key table").

def _shm_path(name: str, what: str) -> str:
    """The segment's path, after checking that `name` is a plain file name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} name {name!r}: use letters, digits, '_', '.', '-'")
    return os.path.join(SHM_DIR, name)


def _create_segment(name: str, size: int, header_tail: bytes, magic: int, what: str,
                    init: Callable[[mmap.mmap], None] | None = None) -> mmap.mmap:
    """Create (exclusively, mode 0600) a zeroed, sparse segment of `size` bytes and map
    it: `init(mm)` fills the body, then `header_tail` goes at offset 8 and `magic` at 0
    last, so an attacher never sees a half-initialised segment as valid. Refused when
    SHM_DIR has less than `size` bytes free (touching an unbacked page of a full tmpfs
    would SIGBUS the process); on any failure nothing is left behind."""
    path = _shm_path(name, what)
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ValueError(f"{what} {name!r} needs {size} bytes, more than {SHM_DIR} has free ({free})")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    mm = None
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        if init is not None:
            init(mm)
        mm[8:8 + len(header_tail)] = header_tail
        mm[0:8] = struct.pack("<Q", magic)
    except BaseException:
        if mm is not None:
            mm.close()
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return mm


def _map_segment(name: str, header_size: int, what: str) -> mmap.mmap:
    """Map an existing segment whole (its size is `len(mm)`); the caller checks the header."""
    fd = os.open(_shm_path(name, what), os.O_RDWR)
    try:
        if os.fstat(fd).st_size < header_size:
            raise ValueError(f"{what} {name!r} is not initialised")
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _check_index(what: str, v, n: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ValueError(f"{what} must be 0..{n - 1}, got {v!r}")


def _claim_worker(q: memoryview, cell: int, worker_index: int, name: str) -> None:
    """Record this process as the owner of worker slot `worker_index` (its pid in int64
    cell `cell` of `q`), refused while another live process holds it. The check and the
    write are not atomic: the supervisor must not attach two processes to one slot at once."""
    holder = q[cell]
    if holder != os.getpid() and _pid_alive(holder):
        raise RuntimeError(f"worker slot {worker_index} of {name!r} is held by live pid {holder}")
    q[cell] = os.getpid()


def _check_limit(limit_index: int, n_limits: int, rate: float, burst: float) -> None:
    """The arguments of `SharedLimitTable.bucket` and `shared_keys.SharedKeyTable.limit`."""
    _check_index("limit_index", limit_index, n_limits)
    for what, v in (("rate", rate), ("burst", burst)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{what} must be a positive finite number, got {v!r}")
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")


def _existing_view(table, views: dict, limit_index: int, rate: float, burst: float):
    """The opening of `SharedLimitTable.bucket` and `shared_keys.SharedKeyTable.limit`:
    refuse the supervisor's or a closed `table` and bad arguments, then return the view
    already made for `limit_index` from `views`, or None when there is none yet or its
    rate or burst differ (the supervisor gave the slot to another limit after a reload
    and reset it, `slots.SlotMap`: the caller makes a new view; the old one stays with
    the snapshot that made it)."""
    if table.worker_index is None:
        raise RuntimeError("the supervisor's table has no worker slot; attach() as a worker")
    if table._mm is None:
        raise ValueError("table is closed")
    _check_limit(limit_index, table.n_limits, rate, burst)
    old = views.get(limit_index)
    if old is not None and (old.rate, old.burst) != (float(rate), float(burst)):
        return None
    return old


class SharedBucket:
    """One limit of a `SharedLimitTable`, as seen by one worker. Not thread-safe within
    a worker (one event loop thread per worker is the intended use)."""

    __slots__ = ("_c", "_m", "_i", "rate", "burst", "_epoch", "index", "_policy")

    def __init__(self, c: memoryview, m: memoryview[float], i: int, rate: float, burst: float,
                 epoch: float, index: int) -> None:
        self._c = c          # int64 consumed counters of every worker for this limit
        self._m = m          # float64 running maxima of A of every worker
        self._i = i          # this worker's slot
        self.rate = rate
        self.burst = burst
        self._epoch = epoch
        self.index = index
        self._policy: Policy | None = None  # the `throttle.Policy` it advertises; set by whoever wires it

    def take(self, now: float, n: int = 1) -> float:
        """Take `n` tokens at monotonic time `now`: 0.0 when admitted, else the number of
        seconds after which `n` tokens will be available (inf when n > burst)."""
        c = self._c
        m = self._m
        a = self.rate * (now - self._epoch) - sum(c)
        top = max(m)
        if a > top:                      # bucket full: remember where the cap cut in
            m[self._i] = a
            top = a
        tokens = self.burst + a - top
        if tokens >= n:
            c[self._i] += n              # own cell only; written after the maximum
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - tokens) / self.rate

    def tokens(self, now: float) -> float:
        """The bucket's level at `now` (negative only after a race over-admitted)."""
        a = self.rate * (now - self._epoch) - sum(self._c)
        return self.burst + a - max(max(self._m), a)

    def remaining(self, now: float) -> int:
        """Whole tokens left at `now` (0..burst), for RateLimit headers."""
        t = self.tokens(now)
        return int(t) if t > 0 else 0

    # The level interface of `throttle.LevelChain`.
    def wait(self, now: float) -> float:
        t = self.tokens(now)
        return 0.0 if t >= 1.0 else (1.0 - t) / self.rate

    def spend(self, now: float) -> tuple[int, float]:
        """Take one token unconditionally (the chain already decided) and return (whole
        tokens left, seconds until full). Counted even if another worker took the last
        token since `wait`: the race shows as a negative level that the refill pays back,
        which keeps the over-admission bound non-cumulative."""
        c = self._c
        m = self._m
        a = self.rate * (now - self._epoch) - sum(c)
        top = max(m)
        if a > top:
            m[self._i] = a
            top = a
        c[self._i] += 1
        t = self.burst + a - 1 - top
        return (int(t) if t > 0 else 0), max(0.0, (self.burst - t) / self.rate)

    def state(self, now: float) -> tuple[int, float]:
        t = self.tokens(now)
        return (int(t) if t > 0 else 0), max(0.0, (self.burst - t) / self.rate)

    def consumed(self) -> int:
        """Tokens consumed by all workers since the table was created."""
        return sum(self._c)

    def _release(self) -> None:
        self._c.release()
        self._m.release()


class _Segment:
    """Lifecycle shared by the shared-memory tables: the supervisor's `unlink`, and use as
    a context manager (closing the mapping). Subclasses set `name`, `KIND` and `close`."""

    KIND = "shared table"
    name: str

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def unlink(self) -> None:
        """Supervisor side: remove the segment's name (mappings stay valid until closed)."""
        try:
            os.unlink(_shm_path(self.name, self.KIND))
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SharedLimitTable(_Segment):
    """A shared-memory table of `n_limits` token buckets for `n_workers` processes."""

    KIND = "shared limit table"

    def __init__(self, name: str, mm: mmap.mmap, n_workers: int, n_limits: int,
                 epoch: float, worker_index: int | None, owner: bool) -> None:
        self.name = name
        self.n_workers = n_workers
        self.n_limits = n_limits
        self.epoch = epoch
        self.worker_index = worker_index
        self._owner = owner
        self._mm: mmap.mmap | None = mm
        self._q = memoryview(mm).cast("q")
        self._d = memoryview(mm).cast("d")
        self._buckets: dict[int, SharedBucket] = {}
        self._replaced: list[SharedBucket] = []  # views of limits whose slot was given to another
        _, limits, _ = _layout(n_workers, n_limits)
        self._limits_cell = limits // 8

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, n_workers: int, n_limits: int = 1024,
               epoch: float | None = None) -> SharedLimitTable:
        """Supervisor side: create (exclusively, mode 0600) and initialise the segment.
        Every bucket starts full. `epoch` defaults to `time.monotonic()` (it only sets
        precision). Refused when /dev/shm has not enough free space."""
        if not (isinstance(n_workers, int) and 1 <= n_workers <= MAX_WORKERS):
            raise ValueError(f"n_workers must be 1..{MAX_WORKERS}, got {n_workers!r}")
        if not (isinstance(n_limits, int) and 1 <= n_limits <= MAX_LIMITS):
            raise ValueError(f"n_limits must be 1..{MAX_LIMITS}, got {n_limits!r}")
        epoch = time.monotonic() if epoch is None else float(epoch)
        _, limits, size = _layout(n_workers, n_limits)

        def start_full(mm: mmap.mmap) -> None:
            # M cells start at -inf: the first check of a limit finds it full.
            neg_inf = struct.pack("<d", -math.inf) * n_workers
            for k in range(n_limits):
                off = limits + k * 16 * n_workers + 8 * n_workers
                mm[off:off + 8 * n_workers] = neg_inf

        header = _HEADER.pack(0, _VERSION, n_workers, n_limits, epoch, 0, 0, 0)
        mm = _create_segment(name, size, header[8:], _MAGIC, "shared limit table", start_full)
        return cls(name, mm, n_workers, n_limits, epoch, None, owner=True)

    @classmethod
    def attach(cls, name: str, worker_index: int) -> SharedLimitTable:
        """Worker side: map the segment the supervisor created and claim slot
        `worker_index` (refused while another live process holds it)."""
        mm = _map_segment(name, _HEADER_SIZE, "shared limit table")
        try:
            magic, version, n_workers, n_limits, epoch, *_ = _HEADER.unpack_from(mm, 0)
            if (magic != _MAGIC or version != _VERSION or not 1 <= n_workers <= MAX_WORKERS
                    or not 1 <= n_limits <= MAX_LIMITS or _layout(n_workers, n_limits)[2] != len(mm)):
                raise ValueError(f"shared limit table {name!r} has an unknown layout")
            _check_index("worker_index", worker_index, n_workers)
        except BaseException:
            mm.close()
            raise
        table = cls(name, mm, n_workers, n_limits, epoch, worker_index, owner=False)
        try:
            _claim_worker(table._q, _HEADER_SIZE // 8 + worker_index, worker_index, name)
        except BaseException:
            table.close()
            raise
        return table

    def close(self) -> None:
        """Unmap (every bucket of this table becomes unusable). Idempotent."""
        if self._mm is None:
            return
        for b in [*self._buckets.values(), *self._replaced]:
            b._release()
        self._buckets.clear()
        self._replaced.clear()
        self._q.release()
        self._d.release()
        self._mm.close()
        self._mm = None


    def reset(self, limit_index: int) -> None:
        """Supervisor side: make limit `limit_index` new (nothing consumed, full at its
        first check) before it is given to another limit."""
        if not self._owner or self._mm is None:
            raise RuntimeError("only the supervisor's open table resets a limit")
        _check_index("limit_index", limit_index, self.n_limits)
        n = self.n_workers
        base = self._limits_cell + limit_index * 2 * n
        for k in range(n):
            self._q[base + k] = 0
            self._d[base + n + k] = -math.inf

    # ------------------------------------------------------------------ buckets
    def bucket(self, limit_index: int, rate: float, burst: float) -> SharedBucket:
        """The bucket of limit `limit_index` for this worker. Every worker must pass the
        same rate and burst for the same index."""
        old = _existing_view(self, self._buckets, limit_index, rate, burst)
        if old is not None:
            return old
        n = self.n_workers
        base = self._limits_cell + limit_index * 2 * n
        b = SharedBucket(self._q[base:base + n], self._d[base + n:base + 2 * n],
                         cast(int, self.worker_index),  # not None: _existing_view refused that
                         float(rate), float(burst), self.epoch, limit_index)
        replaced = self._buckets.get(limit_index)
        if replaced is not None:  # the slot's previous limit: its views are released at close
            self._replaced.append(replaced)
        self._buckets[limit_index] = b
        return b
