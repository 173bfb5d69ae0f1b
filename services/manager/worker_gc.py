"""Garbage collection of dead workers' records.

A worker whose heartbeat lapsed keeps its record (shown as dead in /admin/status) so an
operator sees what went away; after ``WORKER_GC_GRACE_S`` without a heartbeat its records
(worker hash, registry entry, assignment and ledger hashes) are deleted, so records of
workers long gone (or registered by someone who then went away) cannot pile up for every
scheduler pass and status read to carry. A worker that comes back simply registers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from shared.models import WorkerView
from shared.settings import ManagerSettings
from shared.store import Store

logger = logging.getLogger(__name__)


def expired(workers: Sequence[WorkerView], silent_s: float, now: float) -> list[str]:
    """Ids of the dead workers last seen more than ``silent_s`` ago (pure: no I/O)."""
    return [w.worker_id for w in workers if not w.alive and now - w.last_seen > silent_s]


async def gc_workers(
    store: Store, token: str, workers: list[WorkerView], settings: ManagerSettings,
    trust_liveness: bool, pace: float = 1.0,
) -> list[WorkerView]:
    """Delete the records of workers dead past the grace period; the workers still listed.
    Not while liveness cannot be trusted (right after a Redis outage every heartbeat key may
    have lapsed); the store re-checks, in its transaction, that each is still dead and
    unassigned and that ``token`` still holds the lease."""
    if not trust_liveness:
        return workers
    gone = set()
    # Dead since its heartbeat key lapsed, one TTL (paced: shared/pace.py) after the last
    # heartbeat.
    since_last_seen = settings.worker_gc_grace_s + settings.heartbeat_ttl_s * pace
    for wid in expired(workers, since_last_seen, time.time()):
        if await store.remove_dead_worker(token, wid):
            logger.info("deleted the records of worker %s: no heartbeat for over %.0f s", wid,
                        settings.worker_gc_grace_s)
            gone.add(wid)
    return [w for w in workers if w.worker_id not in gone] if gone else workers
