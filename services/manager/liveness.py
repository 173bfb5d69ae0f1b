"""When the scheduler next checks each worker's heartbeat key.

Checking every heartbeat key on every tick (one ``EXISTS`` of 5,000 keys, ten times a second)
was the largest share of Redis's time at 5,000 workers. A heartbeat key does not vanish before
its time to live runs out unless someone deletes it, so each one is checked when it is due to
expire: its ``PTTL`` (on Redis's clock; no machine's clock matters) says when. A worker that
beat meanwhile is found alive with a fresh TTL and checked again when that one runs out (every
4 to 6 s with the default heartbeat); one that did not is found gone at the first tick after its
key expired, as before. A key deleted before its time (a worker leaving cleanly: its hint makes
it due at once; an operator's ``DEL``) is found by a sweep of every key every
``LIVENESS_SWEEP_S``. A dead worker is checked again every ``DEAD_RECHECK_S`` (it may come back).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

# How often a worker found dead is checked for a new heartbeat between sweeps.
DEAD_RECHECK_S = 1.0


class LivenessSchedule:
    def __init__(self, no_expiry_recheck_s: float) -> None:
        # A key without an expiry (written by hand) is checked again this often.
        self.no_expiry_recheck_s = no_expiry_recheck_s
        self._at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._at

    def reset(self, ttls: dict[str, int], now: float) -> dict[str, bool]:
        """Every worker's next check from its key's PTTL (the full pass's reading); returns
        which are alive."""
        self._at, self._heap = {}, []
        return self.checked(ttls, now)

    def sync(self, worker_ids: Iterable[str], now: float) -> None:
        """Follow the pool: workers not scheduled yet are due now; gone ones are dropped."""
        ids = set(worker_ids)
        for w in ids - set(self._at):
            self.soon(w, now)
        for w in set(self._at) - ids:
            del self._at[w]  # its heap entries are skipped as stale

    def soon(self, worker_id: str, now: float) -> None:
        self._schedule(worker_id, now)

    def due(self, now: float) -> list[str]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            at, w = heapq.heappop(self._heap)
            if self._at.get(w) == at:
                out.append(w)
                del self._at[w]
        return out

    def checked(self, ttls: dict[str, int], now: float) -> dict[str, bool]:
        """Record the PTTLs read (ms; -2: no key, -1: no expiry) and schedule each worker's
        next check; returns which of them are alive."""
        alive = {}
        for w, ttl in ttls.items():
            alive[w] = ttl != -2
            if ttl == -2:
                self._schedule(w, now + DEAD_RECHECK_S)
            elif ttl == -1:
                self._schedule(w, now + self.no_expiry_recheck_s)
            else:
                self._schedule(w, now + ttl / 1000)
        return alive

    def _schedule(self, worker_id: str, at: float) -> None:
        self._at[worker_id] = at
        heapq.heappush(self._heap, (at, worker_id))
        if len(self._heap) > 4 * len(self._at) + 64:
            # Stale entries (rescheduled workers) are dropped now and then: the heap stays
            # a few times the pool's size however long the scheduler runs.
            self._heap = [(t, w) for t, w in self._heap if self._at.get(w) == t]
            heapq.heapify(self._heap)
