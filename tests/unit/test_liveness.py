"""The scheduler's liveness schedule: each heartbeat key checked when it is due to expire."""

from __future__ import annotations

from services.manager.liveness import DEAD_RECHECK_S, LivenessSchedule


def test_keys_are_due_when_they_expire() -> None:
    live = LivenessSchedule(no_expiry_recheck_s=6.0)
    live.reset({"a": 4000, "b": 6000, "gone": -2, "pinned": -1}, now=100.0)
    assert live.due(100.5) == []
    assert live.due(101.0) == ["gone"]  # a dead worker is checked again for a comeback
    assert live.due(104.0) == ["a"]
    # Checked: "a" beat meanwhile (alive, due again when its new TTL runs out).
    assert live.checked({"a": 5000}, 104.0) == {"a": True}
    assert live.due(106.0) == ["b", "pinned"]
    assert live.checked({"b": -2, "pinned": -1}, 106.0) == {"b": False, "pinned": True}
    assert live.due(106.0 + DEAD_RECHECK_S) == ["b"]
    assert live.due(109.0) == ["a"]
    assert live.due(112.0) == ["pinned"]  # no expiry: checked every no_expiry_recheck_s


def test_soon_and_sync_follow_the_pool() -> None:
    live = LivenessSchedule(no_expiry_recheck_s=6.0)
    live.reset({"a": 5000, "b": 5000}, now=0.0)
    live.soon("a", 1.0)  # a hint: checked at the next tick, once
    assert live.due(1.0) == ["a"]
    assert "a" not in live  # until its check is recorded
    live.checked({"a": 5000}, 1.0)
    live.sync(["a", "c"], now=2.0)  # "b" left the pool, "c" joined
    assert "b" not in live and "c" in live
    assert live.due(2.0) == ["c"]
    assert live.due(10.0) == ["a"]


def test_the_heap_stays_bounded() -> None:
    live = LivenessSchedule(no_expiry_recheck_s=6.0)
    live.reset({"a": 5000}, now=0.0)
    for i in range(10_000):
        live.soon("a", float(i))  # rescheduled over and over: stale entries pile up
    assert len(live._heap) <= 4 + 64
    assert live.due(1e9) == ["a"]
