"""Heartbeats paced to the pool's size (shared/pace.py), and what a worker believes of a
manager's pace."""

from __future__ import annotations

import math

import httpx
import pytest

from services.worker.agent import MAX_PACE, _pace_of
from shared.pace import heartbeat_pace


def test_the_pace_is_one_up_to_the_cap_then_grows_with_the_pool() -> None:
    # Defaults: 2 s beats, 1,000 a second at most: 2,000 workers beat unpaced.
    assert heartbeat_pace(1, 2.0, 1000.0) == 1.0
    assert heartbeat_pace(2000, 2.0, 1000.0) == 1.0
    assert heartbeat_pace(5000, 2.0, 1000.0) == 2.5
    assert heartbeat_pace(50_000, 2.0, 1000.0) == 25.0
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
