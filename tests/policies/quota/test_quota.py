"""Usage-plan quotas (edgeplane.quota): periods, the in-memory counter, SQLite persistence."""

from __future__ import annotations

import asyncio
import calendar
import multiprocessing
import sqlite3
import time

import pytest

from edgeplane.policies.quota.store import (
    DEFAULT_DB_PATH,
    QuotaCounter,
    QuotaPeriod,
    QuotaStore,
    usage_report,
)


def T(y, mo, d, h=0, mi=0, s=0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s))


def day(ts: int) -> str:
    return time.strftime("%Y-%m-%d %a", time.gmtime(ts))


# ----------------------------------------------------------------------------- periods


def test_day_period_and_leap_day():
    p = QuotaPeriod("DAY")
    assert p.bounds(T(2026, 11, 25, 13, 5)) == (T(2026, 11, 25), T(2026, 11, 26), "2026-11-25")
    assert p.period_key(T(2028, 2, 29, 23, 59, 59)) == "2028-02-29"
    assert p.reset_at(T(2028, 2, 29, 23, 59, 59)) == T(2028, 3, 1)
    assert p.period_key(T(2028, 3, 1)) == "2028-03-01"
    assert p.period_key(T(2026, 12, 31, 23, 59, 59) + 0.999) == "2026-12-31"
    assert p.period_key(T(2027, 1, 1)) == "2027-01-01"
    assert p.period_start(T(2027, 1, 1) - 0.001) == T(2026, 12, 31)


def test_week_offsets_follow_aws_sunday_is_zero():
    wed = T(2026, 11, 25, 12)
    expect = {0: "Sun", 1: "Mon", 2: "Tue", 3: "Wed", 4: "Thu", 5: "Fri", 6: "Sat"}
    for off, wd in expect.items():
        s, e, key = QuotaPeriod("WEEK", off).bounds(wed)
        assert day(s).endswith(wd)
        assert e - s == 7 * 86400 and s <= wed < e
        # the key is the ISO week of the period's 4th day: Thu 19th..Wed 25th has its
        # middle on Sunday the 22nd (W47); every other offset's middle falls in W48
        assert key == ("2026-W47" if off == 4 else "2026-W48")
    # offset 0: Sunday 00:00 is the boundary
    p = QuotaPeriod("WEEK", 0)
    assert p.period_key(T(2026, 11, 28, 23, 59, 59)) == "2026-W48"  # Saturday
    assert p.period_key(T(2026, 11, 29)) == "2026-W49"  # Sunday
    assert p.reset_at(T(2026, 11, 25)) == T(2026, 11, 29)
    # offset 1 (Monday, ISO weeks)
    m = QuotaPeriod("WEEK", 1)
    assert m.period_key(T(2026, 11, 29, 23)) == "2026-W48"  # Sunday still in the Monday week
    assert m.reset_at(T(2026, 11, 29, 23)) == T(2026, 11, 30)


def test_week_keys_across_year_end_use_iso_week_year():
    m = QuotaPeriod("WEEK", 1)
    # 2026-12-28 (Mon) .. 2027-01-03 (Sun) is ISO week 2026-W53
    assert m.period_key(T(2027, 1, 2)) == "2026-W53"
    assert m.period_key(T(2027, 1, 4)) == "2027-W01"
    # 2024-12-30 (Mon) is in ISO 2025-W01
    assert m.period_key(T(2024, 12, 31)) == "2025-W01"
    # keys are unique and consecutive periods tile time for every offset
    for off in range(7):
        p = QuotaPeriod("WEEK", off)
        t, seen = T(2024, 12, 1), set()
        for _ in range(120):
            s, e, k = p.bounds(t)
            assert k not in seen
            seen.add(k)
            assert p.bounds(e)[0] == e
            t = e


def test_month_offsets_month_ends_and_leap_years():
    p = QuotaPeriod("MONTH")
    assert p.bounds(T(2026, 11, 25)) == (T(2026, 11, 1), T(2026, 12, 1), "2026-11")
    assert p.bounds(T(2026, 12, 31, 23, 59, 59)) == (T(2026, 12, 1), T(2027, 1, 1), "2026-12")
    assert p.reset_at(T(2028, 2, 29, 12)) == T(2028, 3, 1)
    last = QuotaPeriod("MONTH", 27)  # starts on the 28th
    assert last.bounds(T(2028, 2, 28)) == (T(2028, 2, 28), T(2028, 3, 28), "2028-02")
    assert last.period_key(T(2028, 2, 27, 23, 59, 59)) == "2028-01"
    assert last.period_key(T(2028, 2, 29)) == "2028-02"  # leap day
    assert last.period_key(T(2027, 3, 1)) == "2027-02"
    assert last.bounds(T(2027, 1, 5)) == (T(2026, 12, 28), T(2027, 1, 28), "2026-12")
    mid = QuotaPeriod("MONTH", 14)  # starts on the 15th
    assert mid.period_key(T(2026, 1, 14, 23, 59, 59)) == "2025-12"
    assert mid.period_key(T(2026, 1, 15)) == "2026-01"
    assert mid.reset_at(T(2026, 1, 15)) == T(2026, 2, 15)


@pytest.mark.parametrize("unit,offset", [
    ("YEAR", 0), ("day", 0), ("DAY", 1), ("WEEK", 7), ("WEEK", -1), ("MONTH", 28),
    ("MONTH", 1.5), ("MONTH", True), ("MONTH", "3"), (None, 0),
])
def test_bad_periods_are_refused(unit, offset):
    with pytest.raises(ValueError):
        QuotaPeriod(unit, offset)


# ----------------------------------------------------------------------------- counter


def test_consume_to_limit_then_refuse_and_reset_at_boundary():
    c = QuotaCounter(QuotaPeriod("DAY"))
    t = T(2026, 11, 25, 23, 59, 50)
    assert [c.try_consume("k", 3, t) for _ in range(5)] == [True, True, True, False, False]
    assert c.used("k", t) == 3 and c.remaining("k", 3, t) == 0
    assert c.try_consume("other", 3, t)  # keys are independent
    assert not c.try_consume("k", 3, T(2026, 11, 25, 23, 59, 59) + 0.999)
    assert c.try_consume("k", 3, T(2026, 11, 26))  # new day
    assert c.used("k", T(2026, 11, 26)) == 1
    assert c.pending() == 5


def test_per_call_period_and_limit_zero():
    c = QuotaCounter()
    week, month = QuotaPeriod("WEEK", 1), QuotaPeriod("MONTH", 27)
    t = T(2026, 11, 27, 23)
    assert c.try_consume("w", 2, t, week) and c.try_consume("w", 2, t, week)
    assert not c.try_consume("w", 2, T(2026, 11, 29, 23, 59), week)  # Sunday: same week
    assert c.try_consume("w", 2, T(2026, 11, 30), week)  # Monday: reset
    assert c.try_consume("m", 1, t, month) and not c.try_consume("m", 1, t, month)
    assert c.try_consume("m", 1, T(2026, 11, 28), month)  # the 28th: reset
    assert not c.try_consume("z", 0, t)


def test_clock_step_back_does_not_reopen_or_zero_a_period():
    c = QuotaCounter(QuotaPeriod("DAY"), max_backstep=3600)
    after = T(2026, 11, 26, 0, 0, 5)
    assert c.try_consume("k", 2, after)
    # 10 s backwards across midnight: still counted in the 26th, which keeps its count
    assert c.try_consume("k", 2, after - 10)
    assert not c.try_consume("k", 2, after - 10)
    assert c.used("k", after) == 2 and c.used("k", after - 10) == 0
    assert not c.try_consume("k", 2, after + 1)


def test_large_step_back_is_a_correction_and_keeps_later_counts():
    c = QuotaCounter(QuotaPeriod("DAY"), max_backstep=60)
    future = T(2027, 1, 1, 12)
    assert c.try_consume("k", 5, future)
    now = T(2026, 11, 25, 12)
    assert c.try_consume("k", 5, now)  # accepted as a correction: the 25th's own count
    assert c.used("k", now) == 1 and c.used("k", future) == 1  # 2027-01-01 not zeroed


def test_try_consume_is_sync_and_cheap():
    assert not asyncio.iscoroutinefunction(QuotaCounter.try_consume)
    c = QuotaCounter()
    t0 = time.perf_counter()
    now = T(2026, 11, 25)
    for i in range(100_000):
        c.try_consume(f"key-{i & 1023}", 1_000_000, now)
    per_call = (time.perf_counter() - t0) / 100_000
    assert per_call < 20e-6  # generous; about 1 us on a current CPU


# ----------------------------------------------------------------------------- store


def test_default_path_and_schema(tmp_path, monkeypatch):
    assert str(DEFAULT_DB_PATH) == "data/edgeplane.db"
    monkeypatch.chdir(tmp_path)
    with QuotaStore() as s:
        assert s.path == DEFAULT_DB_PATH
    assert (tmp_path / "data" / "edgeplane.db").is_file()
    conn = sqlite3.connect(tmp_path / "data" / "edgeplane.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(usage)")]
    assert cols == ["key_id", "period", "used", "updated_at"]


def test_persistence_across_restart(tmp_path):
    db = tmp_path / "q" / "usage.db"
    now = T(2026, 11, 25, 10)
    s1 = QuotaStore(db, QuotaCounter(QuotaPeriod("MONTH")))
    for _ in range(7):
        assert s1.counter.try_consume("gold-1", 10, now)
    assert s1.flush(now) == 7
    assert s1.counter.pending() == 0
    s1.close(flush=False)

    s2 = QuotaStore(db, QuotaCounter(QuotaPeriod("MONTH")))
    assert s2.load(now + 3600) == 1
    assert s2.counter.used("gold-1", now) == 7
    assert [s2.counter.try_consume("gold-1", 10, now + 3600) for _ in range(4)] == [True] * 3 + [False]
    s2.close()
    # a new period starts from zero; the old one stays on record
    s3 = QuotaStore(db, QuotaCounter(QuotaPeriod("MONTH")))
    s3.load(T(2026, 12, 1))
    assert s3.counter.used("gold-1", T(2026, 12, 1)) == 0
    assert s3.counter.try_consume("gold-1", 10, T(2026, 12, 1))
    s3.close()
    assert [(r["key"], r["period"], r["used"]) for r in usage_report(db)] == [
        ("gold-1", "2026-11", 10), ("gold-1", "2026-12", 1)]


def test_two_stores_on_one_file_add_deltas_and_see_each_other(tmp_path):
    db = tmp_path / "shared.db"
    now = T(2026, 11, 25, 10)
    a = QuotaStore(db, QuotaCounter())
    b = QuotaStore(db, QuotaCounter())
    for _ in range(4):
        assert a.counter.try_consume("k", 10, now)
    for _ in range(3):
        assert b.counter.try_consume("k", 10, now)
    a.flush(now)
    b.flush(now)  # b now knows a's 4
    assert b.counter.used("k", now) == 7
    a.flush(now)  # a learns b's 3
    assert a.counter.used("k", now) == 7
    # both admit only the remaining 3 between them (a flush in between)
    got_a = sum(a.counter.try_consume("k", 10, now) for _ in range(2))
    a.flush(now)
    b.flush(now)
    got_b = sum(b.counter.try_consume("k", 10, now) for _ in range(5))
    assert (got_a, got_b) == (2, 1)
    a.close()
    b.close()
    assert usage_report(db, "k")[0]["used"] == 10


def test_flush_after_boundary_charges_the_period_of_admission(tmp_path):
    db = tmp_path / "u.db"
    with QuotaStore(db, QuotaCounter()) as s:
        assert s.counter.try_consume("k", 5, T(2026, 11, 25, 23, 59, 59))
        assert s.counter.try_consume("k", 5, T(2026, 11, 26, 0, 0, 1))
        s.flush(T(2026, 11, 26, 0, 0, 2))
        assert len(s.counter) == 1  # the ended day was pruned from memory
    assert [(r["period"], r["used"]) for r in usage_report(db)] == [("2026-11-25", 1), ("2026-11-26", 1)]


def test_failed_flush_keeps_deltas(tmp_path):
    db = tmp_path / "u.db"
    s = QuotaStore(db, QuotaCounter(), busy_timeout=0.05)
    now = T(2026, 11, 25)
    for _ in range(3):
        s.counter.try_consume("k", 10, now)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(sqlite3.OperationalError):
        s.flush(now)
    assert s.flush_errors == 1 and s.counter.pending() == 3
    assert s.counter.try_consume("k", 10, now)
    blocker.execute("ROLLBACK")
    assert s.flush(now) == 4
    s.close()
    assert usage_report(db)[0]["used"] == 4


async def test_aflush_runs_off_the_loop(tmp_path):
    db = tmp_path / "u.db"
    s = QuotaStore(db, QuotaCounter())
    now = T(2026, 11, 25)
    for _ in range(5):
        s.counter.try_consume("k", 100, now)
    task = asyncio.ensure_future(s.aflush(now))
    await asyncio.sleep(0)
    assert s.counter.try_consume("k", 100, now)  # admitted while the write is in flight
    assert await task == 5
    assert s.counter.pending() == 1 and s.counter.used("k", now) == 6
    s.close()
    assert usage_report(db)[0]["used"] == 6


def test_load_reads_only_current_periods(tmp_path):
    db = tmp_path / "u.db"
    week = QuotaPeriod("WEEK", 1)
    with QuotaStore(db, QuotaCounter(week)) as s:
        s.counter.try_consume("k", 9, T(2026, 11, 20))  # 2026-W47
        s.flush(T(2026, 11, 20))
        s.counter.try_consume("k", 9, T(2026, 11, 25))  # 2026-W48
        s.counter.try_consume("j", 9, T(2026, 11, 25))
    s2 = QuotaStore(db, QuotaCounter(week))
    assert s2.load(T(2026, 11, 26)) == 2
    assert s2.counter.used("k", T(2026, 11, 26)) == 1
    assert len(s2.counter) == 2
    s2.close()


# ----------------------------------------------------------------------------- real processes

NOW = T(2026, 11, 25, 12)


def _child_consume(db: str, flushed: int, unflushed: int) -> None:
    s = QuotaStore(db, QuotaCounter())
    s.load(NOW)
    for _ in range(flushed):
        assert s.counter.try_consume("k", 10**9, NOW)
    s.flush(NOW)
    for _ in range(unflushed):
        assert s.counter.try_consume("k", 10**9, NOW)
    import os
    os._exit(0)  # a crash: no flush, no close


def _run(target, *args):
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def test_real_restart_and_crash_bound(tmp_path):
    db = str(tmp_path / "u.db")
    p = _run(_child_consume, db, 10, 5)
    p.join(30)
    assert p.exitcode == 0
    # a "restarted" gateway sees the flushed 10; only the 5 unflushed admissions are lost
    s = QuotaStore(db, QuotaCounter())
    s.load(NOW)
    assert s.counter.used("k", NOW) == 10
    s.close()


def _child_worker(db: str, n: int, flush_every: int) -> None:
    s = QuotaStore(db, QuotaCounter())
    s.load(NOW)
    for i in range(n):
        s.counter.try_consume("k", 10**9, NOW)
        if i % flush_every == 0:
            s.flush(NOW)
    s.close()


def test_concurrent_worker_processes_sum_exactly(tmp_path):
    db = str(tmp_path / "u.db")
    QuotaStore(db).close()  # create the schema once
    procs = [_run(_child_worker, db, 2000, 50) for _ in range(4)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [(r["key"], r["period"], r["used"]) for r in usage_report(db)] == [("k", "2026-11-25", 8000)]


# ----------------------------------------------------------------------------- report


def test_usage_report(tmp_path):
    db = tmp_path / "u.db"
    with pytest.raises(FileNotFoundError):
        usage_report(db)
    assert not db.exists()  # the report never creates the file
    with QuotaStore(db, QuotaCounter()) as s:
        for key, n in (("b", 2), ("a", 1)):
            for _ in range(n):
                s.counter.try_consume(key, 10, NOW)
        s.flush(NOW)
    rows = usage_report(db)
    assert [(r["key"], r["period"], r["used"]) for r in rows] == [("a", "2026-11-25", 1), ("b", "2026-11-25", 2)]
    assert usage_report(db, key_id="b") == [{"key": "b", "period": "2026-11-25", "used": 2, "updated_at": NOW}]
    assert usage_report(db, key_id="nobody") == []


def test_flush_refreshes_other_workers_usage_before_any_local_request(tmp_path):
    db = tmp_path / "u.db"
    a, b = QuotaStore(db, QuotaCounter()), QuotaStore(db, QuotaCounter())
    for _ in range(3):
        a.counter.try_consume("k", 3, NOW)
    a.flush(NOW)
    b.flush(NOW + 1)  # b has admitted nothing yet, still learns the total
    assert not b.counter.try_consume("k", 3, NOW + 1)
    a.close()
    b.close()
