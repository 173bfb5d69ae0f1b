"""Many simulated workers' control traffic against Redis, from one process.

    python -m bench.simworkers --redis URL --prefix P --workers 500 --duration 10 --out F

Each simulated worker does what an idle real worker's loops do (services/worker/agent.py):
a heartbeat every HEARTBEAT_INTERVAL_S (2 s), and every RECONCILE_INTERVAL_S (1 s) the real
worker's :class:`AssignmentReader` (a version check; its assignments and models re-read
only when they changed, and at least every RESYNC_S); past 2,000 workers the beats and the
version check stretched by the pool's pace (shared/pace.py), learnt at each full beat.
``--first`` offsets the worker numbers, so that several processes share a large simulated
pool. Ticks are spread evenly over the interval. The heartbeat TTL is generous (30 s) so a
simulator that falls behind never makes the manager declare its workers dead. Every second
it rewrites ``--out`` with the ticks done so far and the ticks due, so a caller can check it
kept up while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import uvloop

from services.worker.assignments import HINTED_POLL_S, AssignmentReader
from shared.keys import Keys
from shared.models import Heartbeat
from shared.pace import pool_pace
from shared.settings import WorkerSettings
from shared.store import Store

HEARTBEAT_S = 2.0
RECONCILE_S = 1.0
RESYNC_S = 30.0
TTL_S = 30.0


_last_error: list[str] = []
# A real worker's heartbeat settings, as it runs by default (no environment read).
DEFAULTS = WorkerSettings.model_construct()
# The pool's pace, as the last full beat of any simulated worker read it (all read one count).
_pace = [1.0]


def _repace(workers: int) -> None:
    _pace[0] = pool_pace(workers, DEFAULTS)


@contextmanager
def failures(done: Counter[str]) -> Iterator[None]:
    """Like the real worker's loops: a failed tick is counted and the loop goes on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported in the output file
        done["errors"] += 1
        _last_error[:] = [f"{type(e).__name__}: {e}"]


async def beat(
    store: Store, worker_id: str, offset: float, stop_at: float, done: Counter[str]
) -> None:
    await asyncio.sleep(offset * HEARTBEAT_S)
    # Like the real worker (services.worker.agent): everything every RESYNC_S, else a bare
    # refresh (nothing it reports changes).
    full = Heartbeat(gpus=[], gpu_message="no GPU (simulated)", load={"instances": 10.0})
    full_at = 0.0
    while time.monotonic() < stop_at:
        with failures(done):
            now = time.monotonic()
            due = now >= full_at
            await store.heartbeat(worker_id, full if due else Heartbeat(), TTL_S * _pace[0])
            if due:
                _repace(await store.worker_count())
                full_at = now + RESYNC_S * _pace[0]
            done["heartbeats"] += 1
        await asyncio.sleep(HEARTBEAT_S * _pace[0])


async def reconcile(
    store: Store, worker_id: str, offset: float, stop_at: float, done: Counter[str]
) -> None:
    await asyncio.sleep(offset * RECONCILE_S)
    # As a worker with hints on that hears none for itself: the versions every HINTED_POLL_S.
    reader = AssignmentReader(store, worker_id, RESYNC_S, HINTED_POLL_S)
    while time.monotonic() < stop_at:
        with failures(done):
            reader.poll_s, reader.resync_s = HINTED_POLL_S * _pace[0], RESYNC_S * _pace[0]
            await reader.current(hinted=False)  # Agent.wanted()
            done["reconciles"] += 1
        await asyncio.sleep(RECONCILE_S)


async def report(out: Path, workers: int, done: Counter[str], stop_at: float) -> None:
    start = time.monotonic()
    while time.monotonic() < stop_at:
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - start
        text = json.dumps({
            "elapsed_s": elapsed, "heartbeats": done["heartbeats"],
            "heartbeats_due": workers * elapsed / (HEARTBEAT_S * _pace[0]),
            "reconciles": done["reconciles"], "reconciles_due": workers * elapsed / RECONCILE_S,
            "errors": done["errors"], "last_error": _last_error[0] if _last_error else None,
        })
        out.write_text(text)  # noqa: ASYNC240 - a few hundred bytes once a second


async def run(url: str, prefix: str, workers: int, duration_s: float, out: Path,
              first: int = 0) -> None:
    # One process plays hundreds of workers: a blocking pool makes ticks queue for a
    # connection instead of failing (redis-py's default pool raises past 100 in use).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=200, timeout=30, decode_responses=True)
    store = Store(aioredis.Redis(connection_pool=pool), Keys(prefix))
    ids = [worker_id(first + i) for i in range(workers)]
    stop_at = time.monotonic() + duration_s
    done: Counter[str] = Counter()
    try:
        beats = [beat(store, w, i / workers, stop_at, done) for i, w in enumerate(ids)]
        recs = [reconcile(store, w, i / workers, stop_at, done) for i, w in enumerate(ids)]
        await asyncio.gather(*beats, *recs, report(out, workers, done, stop_at))
    finally:
        await store.close()


def worker_id(i: int) -> str:
    return f"sim-w{i:04d}"


Simulator = Callable[[str, str, int, float, Path, int], Coroutine[Any, Any, None]]


def cli(doc: str, simulate: Simulator) -> None:
    """The command line shared by the simulators (this one and bench.simfleet)."""
    ap = argparse.ArgumentParser(description=doc.split("\n", maxsplit=1)[0])
    ap.add_argument("--redis", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--workers", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--first", type=int, default=0)
    args = ap.parse_args()
    uvloop.run(simulate(args.redis, args.prefix, args.workers, args.duration, args.out,
                        args.first))


def main() -> None:
    cli(__doc__ or "", run)


if __name__ == "__main__":
    main()
