"""The restart sweep: ending engines that a dead worker process of this pool left behind.

The keeper of each engine (services.worker.keeper) already ends it when its worker dies; the
sweep is the backstop for what a keeper could not end (the keeper itself was killed, or the
machine was too loaded to finish). It works from the engine records in the state dir
(services.worker.ownership), never from process names or environments, which vLLM's engine
processes rewrite. A record is swept only when it belongs to this pool and its launcher (worker
pid and start time) is gone: another pool's engines, and those of a live worker process, are
left alone.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from services.worker.ownership import EngineRecord, Owner
from shared import procs

logger = logging.getLogger(__name__)


def group_is_the_engines(rec: EngineRecord) -> bool:
    """The recorded group still exists and is the engine's, not a reuse of its number.

    Linux does not hand out a pid that is in use as a process group id, so a live group with
    that id is the engine's unless its leader is a different, later process.
    """
    if not procs.group_alive(rec.pgid):
        return False
    leader = procs.proc_start(rec.pgid)
    return leader is None or rec.pgid != rec.engine_pid or leader == rec.engine_start


def _end(recs: list[EngineRecord], grace_s: float) -> None:
    keepers = [r.keeper for r in recs if r.keeper.alive()]
    groups = [r.pgid for r in recs if group_is_the_engines(r)]
    for k in keepers:  # a live keeper ends its tree itself, descendants outside the group too
        procs.signal_pid(k.pid, signal.SIGTERM)
    for g in groups:
        procs.signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (
            any(procs.group_alive(g) for g in groups) or any(k.alive() for k in keepers)):
        time.sleep(0.05)
    for g in groups:
        procs.signal_group(g, signal.SIGKILL)
    for k in keepers:
        if k.alive():
            procs.signal_pid(k.pid, signal.SIGKILL)
    for g in groups:
        procs.wait_group_gone(g, 5.0)


def sweep(owner: Owner, grace_s: float) -> list[EngineRecord]:
    """End the engines of records of ``owner``'s pool whose launcher is gone (SIGKILL after
    ``grace_s``) and drop their records. Returns the records whose processes were still there.
    """
    mine = [r for r in owner.records() if r.pool == owner.pool and not r.launcher.alive()]
    live = [r for r in mine if r.keeper.alive() or group_is_the_engines(r)]
    _end(live, grace_s)
    for rec in mine:
        Path(owner.path(rec.alias, rec.pool)).unlink(missing_ok=True)
    for rec in live:
        logger.warning("ended orphaned engine of %s (process group %d, keeper %d), left by "
                       "worker process %s of this pool, which is gone", rec.alias, rec.pgid,
                       rec.keeper_pid, rec.launcher)
    return live
