"""Heartbeats paced to the pool's size.

A worker beats every ``HEARTBEAT_INTERVAL_S`` with a TTL of ``HEARTBEAT_TTL_S``; in a pool of
thousands, those beats (and each worker's unhinted check of its assignment versions) are most
of Redis's steady load, and they grow with every worker added. Past ``HEARTBEAT_MAX_PER_S x
HEARTBEAT_INTERVAL_S`` workers (2,000 with the defaults), every worker stretches its interval,
its TTL and that check by the same factor, so the pool's heartbeats stay at about
``HEARTBEAT_MAX_PER_S`` a second however many workers there are (Nomad paces its clients'
heartbeats the same way). The price: a worker that dies is found after its stretched TTL
(15 s instead of 6 at 5,000 workers). A worker learns the pool's size at its full beats (every
``RESYNC_S``), the manager from its own view. Both read each key's TTL from Redis, so they
agree on when a key expires whatever each counted; the manager's own waits (after a Redis
outage, the collection grace) use the highest pace of the last ``RESYNC_S x pace``, since a
worker learns that the pool shrank only at its next full beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import CommonSettings

# A pace is believed up to this (a beat every 100 x HEARTBEAT_INTERVAL_S at most), from a
# manager's reply or from the pool's own count.
MAX_PACE = 100.0


def heartbeat_pace(workers: int, interval_s: float, max_per_s: float) -> float:
    """The factor (1 or more) by which a worker in a pool of ``workers`` stretches its
    heartbeat interval and TTL: 1 up to ``max_per_s x interval_s`` workers, then in
    proportion. ``max_per_s`` 0 turns pacing off."""
    if max_per_s <= 0 or workers <= 0:
        return 1.0
    return min(MAX_PACE, max(1.0, workers / (max_per_s * interval_s)))


def pool_pace(workers: int, settings: CommonSettings) -> float:
    """:func:`heartbeat_pace` with a service's own heartbeat settings."""
    return heartbeat_pace(workers, settings.heartbeat_interval_s, settings.heartbeat_max_per_s)


class BeatPace:
    """A worker's pace, and the rule that keeps its heartbeat key from lapsing across a
    change of pace: the wait before the next beat follows the TTL the last beat wrote.

    ``pace`` is what the next beat is written with; ``written`` what the last one that
    landed was. A beat that failed may or may not have landed (a reply lost after the
    write), so the wait after it is the shorter of the two."""

    def __init__(self) -> None:
        self.pace = 1.0
        self.written = 1.0

    def landed(self, pace: float | None = None) -> None:
        """A beat (or registration) landed, written with ``pace`` (default: the current
        one; a manager says which it used)."""
        self.written = self.pace if pace is None else pace

    def wait_s(self, interval_s: float, failed: bool) -> float:
        return interval_s * (min(self.written, self.pace) if failed else self.written)
