"""The supervisor's slot map (`slots.SlotMap`) and the tables' `reset`.

Real shared-memory tables in /dev/shm; configs loaded through the real loader.
"""

from __future__ import annotations

import os

import pytest

from conftest import base_config
from edgeplane.config.loader import load_config
from edgeplane.policies.throttle import slots as slots_mod
from edgeplane.policies.throttle.shared_keys import SharedKeyTable
from edgeplane.policies.throttle.shared_limits import SharedLimitTable
from edgeplane.policies.throttle.slots import SlotMap, SlotsExhausted, identities


def cfg(burst: int, *, server: bool = True, client: bool = False, extra_route: bool = False):
    routes = [{"route": "GET /a", "integration": {"type": "mock"},
               "throttle": {"rate": 10, "burst": burst, **({"key": "$context.identity.sourceIp"} if client else {})}},
              {"route": "GET /b", "integration": {"type": "mock"}}]
    if extra_route:
        routes.append({"route": "GET /c", "integration": {"type": "mock"}, "throttle": {"rate": 1, "burst": 1}})
    server_throttle = {"throttle": {"rate": 100, "burst": 100}} if server else {}
    return load_config(base_config(None, routes=routes, **server_throttle))


def UNTHROTTLED():
    return load_config(base_config(None, routes=[{"route": "GET /a", "integration": {"type": "mock"}}]))


def test_initial_map_places_every_limit_in_config_order():
    m = SlotMap.initial(cfg(5, extra_route=True))
    kinds = [k for k, _ in identities(cfg(5, extra_route=True))]
    assert kinds == ["plain", "plain", "plain"]
    assert sorted(m.slots["plain"].values()) == [0, 1, 2]
    assert m.capacity["plain"] == 3 + slots_mod.PLAIN_HEADROOM and m.capacity["keyed"] == slots_mod.KEYED_MIN
    # a worker without a map computes the same one
    assert SlotMap.initial(cfg(5, extra_route=True)).slots == m.slots


def test_unchanged_limits_keep_their_slots_and_changed_ones_get_unused_slots():
    m = SlotMap.initial(cfg(5))
    server = next(i for ident, i in m.slots["plain"].items() if ident.startswith("server"))
    route = next(i for ident, i in m.slots["plain"].items() if ident.startswith("route"))
    m2, reset = m.advance(cfg(7), now=0.0)
    assert reset == []
    assert [i for ident, i in m2.slots["plain"].items() if ident.startswith("server")] == [server]
    new_route = [i for ident, i in m2.slots["plain"].items() if ident.startswith("route")]
    assert new_route == [2] and route not in m2.slots["plain"].values()
    assert m.slots["plain"] != m2.slots["plain"]  # advance leaves the old map alone
    # a per-client throttle moves to the keyed table
    m3, _ = m2.advance(cfg(7, client=True), now=0.0)
    assert list(m3.slots["keyed"].values()) == [0] and len(m3.slots["plain"]) == 1


def test_freed_slots_wait_out_the_quarantine_then_are_reset_and_reused():
    m = SlotMap.initial(cfg(1, server=False))
    m.capacity["plain"] = 1  # no headroom: every change must reuse
    with pytest.raises(SlotsExhausted, match="serve --takeover"):
        m.advance(cfg(2, server=False), now=0.0)  # slot 0 is freed by this very reload
    m_a, _ = m.advance(cfg(1, server=False), now=0.0)  # unchanged: fine
    # Free slot 0 by dropping the throttle, then wait: 2 generations and QUARANTINE_SECONDS.
    m_b, _ = m_a.advance(UNTHROTTLED(), now=10.0)
    assert m_b.slots["plain"] == {}
    later = 10.0 + slots_mod.QUARANTINE_SECONDS
    with pytest.raises(SlotsExhausted):  # one generation later only
        m_b.advance(cfg(3, server=False), now=later)
    m_c, _ = m_b.advance(UNTHROTTLED(), now=later)
    with pytest.raises(SlotsExhausted):  # two generations, but too soon
        m_c.advance(cfg(3, server=False), now=later - 1)
    m_d, reset = m_c.advance(cfg(3, server=False), now=later)
    assert reset == [("plain", 0)] and list(m_d.slots["plain"].values()) == [0]


def test_reset_makes_a_plain_bucket_new_again():
    name = f"edgeplane-test-slots-{os.getpid()}"
    sup = SharedLimitTable.create(name, 1, 2)
    try:
        w = SharedLimitTable.attach(name, 0)
        b = w.bucket(1, 1.0, 3)
        assert [b.take(100.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(1.0)]
        sup.reset(1)
        fresh = w.bucket(1, 50.0, 2)  # the slot given to another limit
        assert fresh.consumed() == 0 and fresh.remaining(100.0) == 2
        with pytest.raises(RuntimeError):
            w.reset(1)  # only the supervisor resets
        w.close()
    finally:
        sup.close()
        sup.unlink()


def test_reset_empties_a_keyed_limit():
    name = f"edgeplane-test-slots-keys-{os.getpid()}"
    sup = SharedKeyTable.create(name, 1, 2, slots_per_limit=64)
    try:
        w = SharedKeyTable.attach(name, 0)
        lim = w.limit(1, 1.0, 2)
        assert [lim.take(100.0, "client") for _ in range(3)][:2] == [0.0, 0.0]
        assert lim.remaining(100.0, "client") == 0
        other = w.limit(0, 1.0, 1)
        assert other.take(100.0, "client") == 0.0
        sup.reset(1)
        assert w.limit(1, 1.0, 2).remaining(100.0, "client") == 2
        assert other.remaining(100.0, "client") == 0  # another limit is untouched
        w.close()
    finally:
        sup.close()
        sup.unlink()


def test_a_limit_that_comes_back_takes_its_own_slot_without_a_reset():
    m = SlotMap.initial(cfg(5, server=False))
    first = list(m.slots["plain"].values())
    gone, _ = m.advance(UNTHROTTLED(), now=0.0)
    back, reset = gone.advance(cfg(5, server=False), now=1.0)
    assert list(back.slots["plain"].values()) == first and reset == []
    assert back.unused["plain"] == m.unused["plain"]  # no new slot spent
