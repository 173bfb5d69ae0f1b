"""Heartbeats paced to the pool's size (shared/pace.py): the factor, what a worker believes
of a manager's pace, the worker's wait between beats across a change of pace, and the
manager's waits while workers may still beat at an older, higher pace."""

from __future__ import annotations

import math
import time

import fakeredis
import httpx
import pytest

from services.manager.scheduler import Scheduler
from services.worker.agent import _pace_of
from shared.events import Nudger
from shared.keys import Keys
from shared.pace import MAX_PACE, BeatPace, heartbeat_pace
from shared.settings import ManagerSettings
from shared.store import Store


def test_the_pace_is_one_up_to_the_cap_then_grows_with_the_pool() -> None:
    # Defaults: 2 s beats, 1,000 a second at most: 2,000 workers beat unpaced.
    assert heartbeat_pace(1, 2.0, 1000.0) == 1.0
    assert heartbeat_pace(2000, 2.0, 1000.0) == 1.0
    assert heartbeat_pace(5000, 2.0, 1000.0) == 2.5
    assert heartbeat_pace(50_000, 2.0, 1000.0) == 25.0
    assert heartbeat_pace(10**9, 2.0, 1000.0) == MAX_PACE
    # The pool's beats per second stay at the cap past it.
    for n in (2001, 5000, 12_345):
        assert math.isclose(n / (2.0 * heartbeat_pace(n, 2.0, 1000.0)), 1000.0)
    # 0 turns pacing off; an empty pool is not paced.
    assert heartbeat_pace(50_000, 2.0, 0.0) == 1.0
    assert heartbeat_pace(0, 2.0, 1000.0) == 1.0


@pytest.mark.parametrize(("content", "pace"), [
    (b'{"ok": true, "pace": 2.5}', 2.5),
    (b'{"ok": true}', 1.0),  # a manager that does not pace
    (b'{"pace": 0.1}', 1.0),  # never faster than the worker's own interval
    (b'{"pace": "fast"}', 1.0),
    (b'{"pace": null}', 1.0),
    (b'{"pace": NaN}', 1.0),
    (b'{"pace": Infinity}', MAX_PACE),
    (b'{"pace": 1e9}', MAX_PACE),
    (b'["not", "an", "object"]', 1.0),
])
def test_a_worker_believes_a_managers_pace_within_bounds(content: bytes, pace: float) -> None:
    assert _pace_of(httpx.Response(200, content=content)) == pace


def test_the_wait_follows_the_ttl_the_last_beat_wrote() -> None:
    p = BeatPace()
    assert p.wait_s(2.0, failed=False) == 2.0
    p.pace = 3.0  # learnt at a full beat: the beat that told it was written unpaced
    assert p.wait_s(2.0, failed=False) == 2.0
    p.landed()  # the next beat, written with a TTL three times as long
    assert p.wait_s(2.0, failed=False) == 6.0
    p.pace = 5.0
    # A beat that failed may not have landed: its key has the old TTL, so the old wait.
    assert p.wait_s(2.0, failed=True) == 6.0
    p.pace = 1.0
    # The pool shrank and the beat failed: it may have landed with the short TTL (a reply
    # lost after the write), so the short wait.
    assert p.wait_s(2.0, failed=True) == 2.0
    p.landed(2.5)  # a manager says which pace it wrote the TTL with
    assert p.wait_s(2.0, failed=False) == 5.0


def test_the_manager_waits_at_the_highest_pace_workers_may_still_beat_at(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    settings = ManagerSettings(manager_id="m", heartbeat_interval_s=2.0, heartbeat_ttl_s=6.0,
                               heartbeat_max_per_s=1000.0, resync_s=30.0)
    store = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    s = Scheduler(store, settings, Nudger(store))
    assert 6.0 * s._pace(500) == 6.0
    assert 6.0 * s._pace(10_000) == 30.0  # pace 5
    # The pool shrank: workers learn it at their next full beats, up to RESYNC_S x 5 later,
    # and beat at pace 5 meanwhile (a TTL of 30 s): the wait stays there that long.
    now[0] += 100.0
    assert 6.0 * s._pace(500) == 30.0
    now[0] += (30.0 + 6.0) * 5 + 1
    assert 6.0 * s._pace(500) == 6.0
