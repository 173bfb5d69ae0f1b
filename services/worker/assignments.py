"""What is assigned to this worker, re-read from Redis only when it changed.

The scheduler bumps a worker's assignment version (``assign:versions``) in the transaction
of every write to its assignments or ledger, and every change of a model bumps the models
version; a worker compares both (one round trip, two small commands) and re-reads its
assignments, ledger and models only when one moved. Reading everything every second cost
Redis thousands of commands per second at a few hundred workers. Correctness does not rest
on the versions alone: the whole state is re-read at least every ``resync_s`` as well, so a
counter that went back (a Redis that lost its data and counted up again) costs latency only.

With hints on, the versions themselves are read only after a hint that concerns this worker
(an assignment of its own, any model change, a lost subscription: ``relevant``) and at least
every ``HINTED_POLL_S`` (a hint can be lost without a lost subscription only if a writer
skips it). At 5,000 workers reading them every second was two thirds of Redis's commands,
and every hint of any kind (a route, a demand, a key) woke every worker to read them again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shared.models import Assignment
from shared.store import Store, StoredModel

# With hints on: the assignment versions are read at least this often without a hint.
HINTED_POLL_S = 5.0


def relevant(hint: dict[str, Any], worker_id: str) -> bool:
    """Whether a hint may change what this worker runs: an assignment here (a batch naming
    no single worker may include one), any model change, or hints lost."""
    kind = hint.get("kind")
    if kind == "assign":
        return hint.get("worker") in (None, worker_id)
    return kind in ("model", "resubscribed")


@dataclass(frozen=True)
class Snapshot:
    assigned: dict[str, Assignment]
    reserved: set[str]
    """Aliases with a reservation in this worker's ledger."""
    models: dict[str, StoredModel]
    unreadable: set[str]
    """Assigned aliases whose model record does not parse (reported by the store)."""


class AssignmentReader:
    def __init__(self, store: Store, worker_id: str, resync_s: float,
                 poll_s: float = 0.0) -> None:
        self.store = store
        self.worker_id = worker_id
        self.resync_s = resync_s
        # Without a hint the versions are read at most this often (0: at every call).
        self.poll_s = poll_s
        self._stamp: tuple[str, str] | None = None
        self._last: Snapshot | None = None
        self._read_at = 0.0
        self._checked_at = 0.0
        # Full reads made (for tests and the benchmark: how often it really re-read).
        self.reads = 0

    def invalidate(self) -> None:
        """Re-read at the next call whatever the versions say."""
        self._last = None

    async def current(self, hinted: bool = True) -> Snapshot:
        """What is assigned here. ``hinted``: a relevant hint arrived since the last call
        (the versions are read then, else only every ``poll_s``)."""
        now = time.monotonic()
        if (self._last is not None and not hinted and now - self._checked_at < self.poll_s
                and now - self._read_at < self.resync_s):
            return self._last
        # The versions are read before the state: a write landing in between moves them
        # again, so it is read at the next call at the latest.
        stamp = await self.store.assignment_stamp(self.worker_id)
        self._checked_at = now
        if (self._last is not None and stamp == self._stamp
                and now - self._read_at < self.resync_s):
            return self._last
        assigned, reserved = await self.store.worker_state(self.worker_id)
        models, unreadable = await self.store.get_models_checked(list(assigned))
        self._last = Snapshot(assigned, reserved, models, unreadable)
        self._stamp, self._read_at = stamp, now
        self.reads += 1
        return self._last
