"""Usage-plan quotas (issue 5, item 5): quota periods, an in-memory counter for the hot path,
and its persistence in an embedded SQLite database.

What this module owns
---------------------
- `QuotaPeriod`: the calendar arithmetic of a quota period (``DAY``, ``WEEK`` or ``MONTH``
  with an AWS-style offset), in UTC, from a wall-clock epoch passed in (sans-IO).
- `QuotaCounter`: per ``(key id, period key)`` request counts held in memory. Its
  `QuotaCounter.try_consume` is the hot-path check: no I/O, no locks, no awaits, a few
  dict operations.
- `QuotaStore`: the SQLite file (``sqlite3``, WAL mode, busy timeout) that makes counts
  survive restarts and lets several worker processes share one quota. Table::

      usage(key_id TEXT, period TEXT, used INTEGER, updated_at REAL,
            PRIMARY KEY (key_id, period))

- `usage_report`: the rows, for the ``edgeplane usage`` command.

It does not own: which key a request carries, which plan a key is on, the 429
``{"message":"Limit Exceeded"}`` answer, config validation of ``quota:`` blocks (though
`QuotaPeriod` raises `ValueError` with a readable message for every bad value), nor the
timer that calls `QuotaStore.aflush` (the gateway's ~1 s tick) and `QuotaStore.flush` (at
shutdown).

Periods (UTC)
-------------
- ``DAY``: midnight to midnight UTC. The offset must be 0. Key ``"2026-11-25"``.
- ``WEEK``: seven days from 00:00 UTC on a fixed weekday. As in Amazon API Gateway's
  ``QuotaSettings.offset`` ("the day that a time period starts ... with a time period of
  WEEK, an offset of 0 starts on Sunday, and an offset of 1 starts on Monday"), the offset
  is 0..6 days after **Sunday**: 0 = Sunday, 1 = Monday, ..., 6 = Saturday. Key
  ``"2026-W48"``: the ISO 8601 week (and ISO week-year) that contains the period's
  *fourth* day (its middle). Each ISO week contains exactly one such middle day, so the
  key is unique per period, and for offsets 0 and 1 it is the ISO week of the Monday to
  Saturday of the period (Wednesday 2026-11-25 is in ``2026-W48`` with either).
- ``MONTH``: from 00:00 UTC on day ``offset + 1`` of a month to the same day of the next
  month; the offset is 0..27 so the day exists in every month (no clamping at month ends).
  Key ``"2026-11"``: the year and month in which the period starts.

The period key is computed from the wall clock at the moment a request is admitted; the
count is stored under that key, so a delta flushed after a boundary still lands in the
period in which the request was admitted. Two plans with the same unit but different
week/month offsets produce the same key *labels*; a key id is on one plan at a time, so
this only matters when a plan's offset is changed mid-period (the count carries over).

Invariants
----------
- **Within one process, a quota is exact**: `try_consume` admits while the known count is
  below the limit and counts every admission; the check and the increment have no await
  between them, so concurrent requests on one event loop cannot both take the last unit.
- **Deltas, never absolutes**: a flush adds to the stored count
  (``INSERT ... ON CONFLICT(key_id, period) DO UPDATE SET used = used + excluded.used``) in
  one ``BEGIN IMMEDIATE`` transaction, so several processes sharing the file never
  overwrite each other's counts. A failed flush puts its deltas back; they are retried at
  the next flush, never lost and never written twice.
- **The hot path never touches SQLite.** `QuotaStore.aflush` snapshots the deltas on the
  event loop (one dict swap), runs the transaction in a worker thread, and applies the
  totals it read back on the event loop; the counter is never mutated off the loop.
- **Counts are never lowered by the clock.** The wall clock only chooses the period key;
  no clock movement deletes or zeroes a count (see "Clock jumps").

Crash bound
-----------
Admissions are counted in memory at once and written at the next flush. If a worker
process dies without flushing (``kill -9``, power loss), the requests it admitted since its
last successful flush are not in the database: **at most flush interval x that worker's
admission rate** (with the default 1 s tick, one second of admitted requests; per key, also
never more than the key's quota limit). Nothing flushed is lost: SQLite commits each flush
durably in WAL mode (``synchronous=NORMAL``: a committed flush survives a process crash; an
OS crash or power loss may also lose the last flushes before it). A clean shutdown calls
`QuotaStore.flush`, which writes everything.

Accuracy across worker processes
--------------------------------
Each worker admits against its own count plus the totals it read back at its last flush.
It does not see what the other workers admitted since *their* last flush before *its*
last refresh, a window of at most two flush intervals. So a key's quota can be exceeded by
at most the requests the *other* workers admitted for that key in the last ``2 x flush
interval`` (with the usage plan's throttle holding server-wide at ``r`` requests/s: at
most ``2 x interval x r``; and never more than ``(workers - 1) x limit``). With one worker it
is exact. Once the database total reaches the limit, every worker refuses after its next
flush.

Clock jumps
-----------
The counter keeps a high-water mark of the wall clock it has been given. A step backwards
of up to `QuotaCounter.max_backstep` seconds (default 3,600: NTP corrections, a leap
second, a VM resuming) is ignored: the counter keeps using the later period, its count is
kept and keeps growing, so a step back across a boundary neither reopens an exhausted
period (lock-out) nor starts a fresh empty one (flood). A larger step back is taken as a
deliberate correction of a clock that ran ahead: the counter moves to the earlier period.
The later period's count is not zeroed (it stays in the database, and in memory until it
is pruned after the flush that wrote it); the earlier period's count is read back from the
database at the next flush, so until then (one flush interval) that period may admit up
to its limit again. A step forwards starts the new period, which is what the wall clock
says; if it was wrong and is corrected by less than ``max_backstep``, the counter stays in
that later period until the real time reaches it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_DB_PATH",
    "PERIOD_UNITS",
    "QuotaCounter",
    "QuotaPeriod",
    "QuotaStore",
    "usage_report",
]

DEFAULT_DATA_DIR = Path("data")
DEFAULT_DB_PATH = DEFAULT_DATA_DIR / "edgeplane.db"
PERIOD_UNITS = ("DAY", "WEEK", "MONTH")
_MAX_OFFSET = {"DAY": 0, "WEEK": 6, "MONTH": 27}
_DAY = 86400
_EPOCH = _dt.date(1970, 1, 1)

Key = tuple[str, str]  # (key id, period key)


def _epoch(d: _dt.date) -> int:
    return (d - _EPOCH).days * _DAY


# --------------------------------------------------------------------------- periods


@dataclass(frozen=True)
class QuotaPeriod:
    """A quota period: ``unit`` is ``"DAY"``, ``"WEEK"`` or ``"MONTH"``; ``offset`` in days.

    ``WEEK``: offset 0..6, 0 = Sunday (as AWS). ``MONTH``: offset 0..27, the period starts on
    day ``offset + 1``. ``DAY``: offset 0 only. All times are UTC epoch seconds.
    """

    unit: str = "DAY"
    offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or self.unit not in _MAX_OFFSET:
            raise ValueError(f"unknown quota period {self.unit!r}: expected one of DAY, WEEK, MONTH")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int):
            raise ValueError(f"quota offset must be an integer, not {type(self.offset).__name__}")
        hi = _MAX_OFFSET[self.unit]
        if not 0 <= self.offset <= hi:
            if hi == 0:
                raise ValueError(f"quota offset must be 0 for period DAY, not {self.offset}")
            raise ValueError(f"quota offset for period {self.unit} must be 0..{hi}, not {self.offset}")

    def bounds(self, now: float) -> tuple[int, int, str]:
        """``(start, end, key)`` of the period containing ``now``: ``start <= now < end``."""
        day = _EPOCH + _dt.timedelta(days=int(now // _DAY))
        if self.unit == "DAY":
            start = _epoch(day)
            return start, start + _DAY, day.isoformat()
        if self.unit == "WEEK":
            first_weekday = (self.offset + 6) % 7  # date.weekday(): Monday = 0; offset 0 = Sunday
            sd = day - _dt.timedelta(days=(day.weekday() - first_weekday) % 7)
            iso = (sd + _dt.timedelta(days=3)).isocalendar()
            start = _epoch(sd)
            return start, start + 7 * _DAY, f"{iso.year:04d}-W{iso.week:02d}"
        # MONTH
        first = self.offset + 1
        y, m = day.year, day.month
        if day.day < first:
            y, m = (y, m - 1) if m > 1 else (y - 1, 12)
        ny, nm = (y, m + 1) if m < 12 else (y + 1, 1)
        return (_epoch(_dt.date(y, m, first)), _epoch(_dt.date(ny, nm, first)), f"{y:04d}-{m:02d}")

    def period_start(self, now: float) -> int:
        """Epoch seconds at which the period containing ``now`` began."""
        return self.bounds(now)[0]

    def reset_at(self, now: float) -> int:
        """Epoch seconds at which the period containing ``now`` ends and the quota resets."""
        return self.bounds(now)[1]

    def period_key(self, now: float) -> str:
        """``"2026-11-25"`` (DAY), ``"2026-W48"`` (WEEK) or ``"2026-11"`` (MONTH)."""
        return self.bounds(now)[2]

    def __str__(self) -> str:
        return self.unit if not self.offset else f"{self.unit}+{self.offset}"


DAY = QuotaPeriod("DAY")


# --------------------------------------------------------------------------- counter


class QuotaCounter:
    """In-memory quota counts per ``(key id, period key)``; `try_consume` is the hot path.

    Use from one thread (the event loop). `QuotaStore` reads and writes it only through
    `take_deltas` / `restore_deltas` / `apply_totals`, called on that same thread.
    """

    __slots__ = ("default_period", "max_backstep", "_hw", "_pcache", "_ends", "_used", "_delta")

    def __init__(self, default_period: QuotaPeriod = DAY, *, max_backstep: float = 3600.0) -> None:
        if max_backstep < 0:
            raise ValueError("max_backstep must be >= 0")
        self.default_period = default_period
        self.max_backstep = float(max_backstep)
        self._hw = float("-inf")  # high-water mark of the wall clock seen
        self._pcache: dict[QuotaPeriod, tuple[int, int, str]] = {}
        self._ends: dict[str, int] = {}  # period key -> latest end epoch seen for it
        self._used: dict[Key, int] = {}  # known total: db total at last refresh + local since
        self._delta: dict[Key, int] = {}  # admitted here, not yet flushed

    # -- hot path -----------------------------------------------------------------------

    def try_consume(self, key_id: str, plan_limit: int, now: float,
                    period: QuotaPeriod | None = None) -> bool:
        """Admit one request for ``key_id`` if its count in the current period is below
        ``plan_limit``, counting it; ``False`` (count unchanged) if the quota is used up.

        ``now`` is wall-clock epoch seconds; ``period`` defaults to `default_period`.
        No I/O, no locks, no awaits.
        """
        if period is None:
            period = self.default_period
        hw = self._hw
        if now >= hw:
            self._hw = now
        elif hw - now <= self.max_backstep:
            now = hw  # small step back: stay in the later period
        else:
            self._hw = now  # large step back: a deliberate correction
        c = self._pcache.get(period)
        if c is None or not c[0] <= now < c[1]:
            c = self._roll(period, now)
        k = (key_id, c[2])
        used = self._used.get(k, 0)
        if used >= plan_limit:
            return False
        self._used[k] = used + 1
        d = self._delta
        d[k] = d.get(k, 0) + 1
        return True

    def _roll(self, period: QuotaPeriod, now: float) -> tuple[int, int, str]:
        c = period.bounds(now)
        self._pcache[period] = c
        if self._ends.get(c[2], c[1]) <= c[1]:
            self._ends[c[2]] = c[1]
        return c

    # -- reads --------------------------------------------------------------------------

    def used(self, key_id: str, now: float, period: QuotaPeriod | None = None) -> int:
        """The known count for ``key_id`` in the period containing ``now`` (no clamping)."""
        return self._used.get((key_id, (period or self.default_period).period_key(now)), 0)

    def remaining(self, key_id: str, plan_limit: int, now: float,
                  period: QuotaPeriod | None = None) -> int:
        return max(0, plan_limit - self.used(key_id, now, period))

    def known_keys(self) -> list[Key]:
        """Every ``(key id, period key)`` with a known count (for stores that refresh them)."""
        return list(self._used)

    def pending(self) -> int:
        """Requests admitted here and not yet flushed (what a crash now would lose)."""
        return sum(self._delta.values())

    def live_periods(self, now: float | None = None) -> list[str]:
        """Period keys of the current period of every `QuotaPeriod` in use (plus the
        default period), at the high-water clock (or ``now`` if given)."""
        t = self._hw if now is None else now
        keys: dict[str, None] = {}
        if t != float("-inf"):
            for p in (self.default_period, *self._pcache):
                keys[self._roll(p, t)[2] if now is None else p.period_key(t)] = None
        return list(keys)

    # -- used by QuotaStore (same thread as try_consume) ---------------------------------

    def observe(self, now: float) -> None:
        """Advance the high-water clock to ``now`` if it is later (never moves it back), so
        `live_periods` and pruning follow the wall clock while no request arrives."""
        if now > self._hw:
            self._hw = now

    def take_deltas(self) -> dict[Key, int]:
        """Detach and return the unflushed deltas (one swap; new admissions go to a new dict)."""
        d, self._delta = self._delta, {}
        return d

    def restore_deltas(self, deltas: Mapping[Key, int]) -> None:
        """Put back deltas whose write failed, to be retried at the next flush."""
        d = self._delta
        for k, n in deltas.items():
            d[k] = d.get(k, 0) + n

    def apply_totals(self, totals: Mapping[Key, int], live: Iterable[str] = ()) -> None:
        """Replace the known counts by the database ``totals`` (read after this process's
        deltas were added) plus whatever was admitted here since. ``live`` lists the period
        keys that were fully read back: an in-memory entry of a live period missing from
        ``totals`` has no stored count (e.g. an operator deleted the row). Then prune
        entries of periods that ended before the clock's high-water mark."""
        used, delta = self._used, self._delta
        for k, n in totals.items():
            used[k] = n + delta.get(k, 0)
        live_set = set(live)
        if live_set:
            for k in [k for k in used if k[1] in live_set and k not in totals]:
                used[k] = delta.get(k, 0)
        self.prune()

    def prune(self) -> None:
        """Forget flushed counts of periods that ended before the high-water clock (they
        stay in the database)."""
        hw, ends, delta = self._hw, self._ends, self._delta
        dead = {pk for pk, end in ends.items() if end <= hw}
        if not dead:
            return
        for k in [k for k in self._used if k[1] in dead and k not in delta]:
            del self._used[k]
        still = {k[1] for k in delta}
        for pk in dead - still:
            del ends[pk]

    def __len__(self) -> int:
        return len(self._used)


# --------------------------------------------------------------------------- store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id     TEXT    NOT NULL,
    period     TEXT    NOT NULL,
    used       INTEGER NOT NULL DEFAULT 0,
    updated_at REAL    NOT NULL,
    PRIMARY KEY (key_id, period)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_period ON usage (period);
"""

_UPSERT = ("INSERT INTO usage (key_id, period, used, updated_at) VALUES (?, ?, ?, ?) "
           "ON CONFLICT(key_id, period) DO UPDATE SET used = used + excluded.used, "
           "updated_at = excluded.updated_at")

_IN_CHUNK = 500  # bound on "period IN (...)" parameters per SELECT


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _select_periods(conn: sqlite3.Connection, periods: list[str]) -> dict[Key, int]:
    out: dict[Key, int] = {}
    for i in range(0, len(periods), _IN_CHUNK):
        chunk = periods[i:i + _IN_CHUNK]
        q = f"SELECT key_id, period, used FROM usage WHERE period IN ({','.join('?' * len(chunk))})"
        for key_id, period, used in conn.execute(q, chunk):
            out[(key_id, period)] = used
    return out


class QuotaStore:
    """The SQLite file behind a `QuotaCounter`.

    ``QuotaStore(path)`` opens (creating the file, its directory and the table if needed)
    ``path`` (default ``./data/edgeplane.db``) in WAL mode with a busy timeout of
    ``busy_timeout`` seconds. Call `load` at start, `aflush` from the gateway's tick
    (~1 s), and `flush` at shutdown. Several processes may open the same file; each one
    has its own `QuotaStore` and counter.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB_PATH,
                 counter: QuotaCounter | None = None, *, busy_timeout: float = 5.0,
                 clock: Any = time.time) -> None:
        self.path = Path(path)
        self.counter = counter if counter is not None else QuotaCounter()
        self.clock = clock
        self.flushes = 0
        self.flush_errors = 0
        self.last_error: BaseException | None = None
        self._io = threading.Lock()  # serialises this store's transactions (never the hot path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = _connect(self.path, busy_timeout)
        with self._io:
            self._conn.executescript(_SCHEMA)

    # -- start ----------------------------------------------------------------------------

    def load(self, now: float | None = None, periods: Iterable[QuotaPeriod] = ()) -> int:
        """Read the stored counts of the current period of each of ``periods`` (and of the
        counter's default period) into the counter. Returns the number of rows read."""
        now = self.clock() if now is None else now
        c = self.counter
        c.observe(now)
        keys = list(dict.fromkeys(c._roll(p, now)[2] for p in (c.default_period, *periods)))
        with self._io:
            totals = _select_periods(self._require(), keys)
        c.apply_totals(totals, keys)
        return len(totals)

    # -- flush ----------------------------------------------------------------------------

    def _write(self, deltas: Mapping[Key, int], live: list[str], now: float) -> dict[Key, int]:
        """One transaction: add ``deltas``, then read back the totals of ``live`` periods and
        of every key written. Pure I/O on its arguments; safe to run in a thread."""
        with self._io:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if deltas:
                    conn.executemany(_UPSERT, [(k, p, n, now) for (k, p), n in deltas.items() if n])
                totals = _select_periods(conn, live)
                missing = [k for k in deltas if k not in totals]
                for k in missing:
                    row = conn.execute("SELECT used FROM usage WHERE key_id = ? AND period = ?", k).fetchone()
                    if row is not None:
                        totals[k] = row[0]
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
        return totals

    def flush(self, now: float | None = None) -> int:
        """Write the deltas admitted since the last flush and refresh the counter with the
        totals of all processes. Blocking (SQLite I/O and up to ``busy_timeout`` waiting for
        another process): call it from the event loop only at shutdown; use `aflush` from
        the tick. Returns the number of requests written. On error the deltas are kept for
        the next flush and the exception propagates."""
        now, deltas, live = self._take(now)
        try:
            totals = self._write(deltas, live, now)
        except BaseException as exc:
            self._failed(deltas, exc)
            raise
        return self._applied(deltas, live, totals)

    async def aflush(self, now: float | None = None) -> int:
        """`flush` with the transaction in a worker thread: the event loop only swaps the
        delta dict and applies the totals. Errors are counted in `flush_errors` /
        `last_error` and re-raised; the deltas are kept for the next flush."""
        now, deltas, live = self._take(now)
        try:
            totals = await asyncio.to_thread(self._write, deltas, live, now)
        except BaseException as exc:
            self._failed(deltas, exc)
            raise
        return self._applied(deltas, live, totals)

    # The two halves around the transaction, shared by `flush` and `aflush`.
    def _take(self, now: float | None) -> tuple[float, Any, Any]:
        now = self.clock() if now is None else now
        c = self.counter
        c.observe(now)
        return now, c.take_deltas(), c.live_periods()

    def _failed(self, deltas: Any, exc: BaseException) -> None:
        self.counter.restore_deltas(deltas)  # kept for the next flush
        self.flush_errors += 1
        self.last_error = exc

    def _applied(self, deltas: Any, live: Any, totals: Any) -> int:
        self.counter.apply_totals(totals, live)
        self.flushes += 1
        return sum(deltas.values())

    # -- lifecycle ------------------------------------------------------------------------

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("QuotaStore is closed")
        return self._conn

    def close(self, *, flush: bool = True) -> None:
        """Flush (unless ``flush=False``) and close the database. Idempotent."""
        if self._conn is None:
            return
        try:
            if flush:
                self.flush()
        finally:
            with self._io:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> QuotaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QuotaStore({str(self.path)!r}, keys={len(self.counter)}, pending={self.counter.pending()})"


# --------------------------------------------------------------------------- report


def usage_report(db_path: str | os.PathLike[str] = DEFAULT_DB_PATH,
                 key_id: str | None = None) -> list[dict[str, Any]]:
    """Stored usage rows, ``[{"key": ..., "period": ..., "used": ..., "updated_at": ...}]``,
    sorted by key then period; only ``key_id``'s rows if given. Opens the file read-only
    (never creates it); raises `FileNotFoundError` if it does not exist. Counts not yet
    flushed by running workers (at most one flush interval) are not included."""
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no usage database at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        q = "SELECT key_id, period, used, updated_at FROM usage"
        args: tuple[str, ...] = ()
        if key_id is not None:
            q += " WHERE key_id = ?"
            args = (key_id,)
        rows = conn.execute(q + " ORDER BY key_id, period", args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()
    return [{"key": k, "period": p, "used": u, "updated_at": t} for k, p, u, t in rows]

