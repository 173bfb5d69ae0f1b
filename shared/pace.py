"""Heartbeats paced to the pool's size.

A worker beats every ``HEARTBEAT_INTERVAL_S`` with a TTL of ``HEARTBEAT_TTL_S``; in a pool of
thousands, those beats (and each worker's unhinted check of its assignment versions) are most
of Redis's steady load, and they grow with every worker added. Past ``HEARTBEAT_MAX_PER_S x
HEARTBEAT_INTERVAL_S`` workers (2,000 with the defaults), every worker stretches its interval,
its TTL and that check by the same factor, so the pool's heartbeats stay at about
``HEARTBEAT_MAX_PER_S`` a second however many workers there are (Nomad paces its clients'
heartbeats the same way). The price: a worker that dies is found after its stretched TTL
(15 s instead of 6 at 5,000 workers). A worker learns the pool's size at its full beats (every
``RESYNC_S``), the manager from its own view; both read each key's TTL from Redis, so a worker
and a manager that count the pool differently still agree on when a key expires.
"""

from __future__ import annotations


def heartbeat_pace(workers: int, interval_s: float, max_per_s: float) -> float:
    """The factor (1 or more) by which a worker in a pool of ``workers`` stretches its
    heartbeat interval and TTL: 1 up to ``max_per_s x interval_s`` workers, then in
    proportion. ``max_per_s`` 0 turns pacing off."""
    if max_per_s <= 0 or workers <= 0:
        return 1.0
    return max(1.0, workers / (max_per_s * interval_s))
