"""How long the scheduler takes to act on a dead worker, in process, for one code tree.

    .venv/bin/python -m bench.dead_worker [--tree DIR] [--workers 200] [--victims 10]

A throwaway redis-server, ``--workers`` registered idle workers and the tree's ``Scheduler``
running its own loop (``Scheduler.run``: a tick every 0.1 s, as by default). Each victim
registers, beats like a worker (its heartbeat key set with a 1.5 s TTL every 0.5 s), gets a
model placed on it, then stops beating at a different phase of the manager's timer; measured:
from when its key expires (its last beat + 1.5 s) until its assignment is gone (polled every
2 ms). No other load: ``bench.cp_scale`` measures the same with thousands of simulated
workers beating. ``--tree`` runs an older checkout's scheduler (e.g. a ``git worktree``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


async def run(url: str, workers: int, victims: int) -> dict[str, Any]:
    # Imported here: from the tree on sys.path (main() puts --tree first).
    from bench.cp_scale import VICTIM_TTL_S, beat_as_victim  # noqa: PLC0415 - after --tree
    from services.manager.scheduler import Scheduler  # noqa: PLC0415 - from --tree
    from shared.events import Nudger  # noqa: PLC0415 - from --tree
    from shared.keys import Keys  # noqa: PLC0415 - from --tree
    from shared.models import ModelSpec, WorkerRegistration  # noqa: PLC0415 - from --tree
    from shared.settings import ManagerSettings  # noqa: PLC0415 - from --tree
    from shared.store import Store, connect  # noqa: PLC0415 - from --tree

    store = Store(connect(url), Keys("deadworker"))

    def reg(w: str) -> WorkerRegistration:
        return WorkerRegistration(worker_id=w, url=f"http://{w}:1", engines=["vllm"],
                                  gpu_message="simulated", version="bench")

    for i in range(workers):
        await store.register_worker(reg(f"w{i}"), 3600)
    nudger = Nudger(store)
    # HEARTBEAT_TTL_S as the victims': a manager trusts liveness that long after it starts.
    sched = Scheduler(store, ManagerSettings(manager_id="bench", lease_ttl_s=30,
                                             heartbeat_ttl_s=VICTIM_TTL_S), nudger)
    tasks = [asyncio.create_task(nudger.run()), asyncio.create_task(sched.run())]
    took: list[float] = []
    try:
        await asyncio.sleep(1.0)
        for i in range(victims):
            victim, alias = f"victim{i}", f"victim-model-{i}"
            await store.register_worker(reg(victim), 3600)
            beats: list[float] = []
            beating = asyncio.create_task(beat_as_victim(store, victim, beats))
            await asyncio.sleep(2.0)  # seen by the scheduler, its liveness trusted
            await store.register_model(ModelSpec(alias=alias, model_name="org/m",
                                                 engine="vllm"))
            placed = False
            for _ in range(250):
                if await store.r.hexists(store.k.assign(victim), alias):
                    placed = True
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3 + 0.1 * (i % 10) * 0.9)  # any phase of the timer
            beating.cancel()
            if not placed:
                continue  # placed elsewhere: nothing to measure
            landed = beats[-1] + VICTIM_TTL_S
            while await store.r.hexists(store.k.assign(victim), alias):
                await asyncio.sleep(0.002)
            took.append(time.perf_counter() - landed)
    finally:
        for t in tasks:
            t.cancel()
        await store.close()
    ms = [round(t * 1000) for t in took]
    return {"workers": workers, "victims": len(ms), "each_ms": ms,
            "p50_ms": statistics.median(ms) if ms else None, "max_ms": max(ms, default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--victims", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from bench.pool import start_redis  # noqa: PLC0415 - from --tree
    from bench.procset import Children  # noqa: PLC0415 - from --tree

    run_dir = Path(tempfile.mkdtemp(prefix="svllm-deadworker-"))
    children = Children(run_dir / "logs")
    try:
        url, _ = start_redis(children, run_dir / "redis")
        result = asyncio.run(run(url, args.workers, args.victims))
        print(json.dumps({"tree": str(args.tree)} | result))
    finally:
        children.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
