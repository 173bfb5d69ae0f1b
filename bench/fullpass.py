"""The scheduler's full pass (the periodic resync) in process, and what its bulk reads cost.

    .venv/bin/python -m bench.fullpass [--aliases 50000] [--workers 500] [--passes 3]
                                       [--profile PATH] [--reads]

Populates a throwaway redis-server with ``--workers`` registered workers and ``--aliases``
models, places every alias (one ``Scheduler.tick``), marks each placement running, then times
``--passes`` full passes (``Scheduler.reconcile``), and ``--ticks`` steady ticks (client CPU per
tick); ``--profile`` writes a cProfile of the ticks (or of one more pass) to PATH and prints
its top functions. ``--reads`` instead compares, on the same Redis,
Redis's CPU per key and the client's wall time of reading every model hash and hold as
pipelined commands and through the bulk reads' script (``StoreBase._reads``,
docs/redis.md "Bulk reads"). No simulated worker traffic runs meanwhile: ``bench.cp_scale``
measures the pass with it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.control_plane import Scale, populate, report_running
from bench.pool import start_redis
from bench.procset import Children
from bench.simworkers import worker_id
from services.manager.scheduler import Scheduler
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec
from shared.settings import ManagerSettings
from shared.store import Store, connect

PREFIX = "fullpass"


async def passes(url: str, scale: Scale, count: int, profile: Path | None,
                 ticks: int = 0) -> dict[str, Any]:
    store = Store(connect(url), Keys(PREFIX))
    try:
        out: dict[str, Any] = {"populate_s": await populate(store, scale)}
        sched = Scheduler(store, ManagerSettings(manager_id="bench-fullpass", lease_ttl_s=3600),
                          Nudger(store))
        t0 = time.perf_counter()
        await sched.tick()  # takes the lease and places every alias
        out["placement_s"] = time.perf_counter() - t0
        await report_running(store, [worker_id(i) for i in range(scale.workers)])
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await sched.reconcile()
            times.append(time.perf_counter() - t0)
        out["full_pass_s"] = times
        if ticks:
            # Steady ticks between full passes (nothing changes: no simulated traffic).
            prof = cProfile.Profile() if profile is not None else None
            t0 = time.process_time()
            if prof is not None:
                prof.enable()
            for _ in range(ticks):
                await sched.tick()
            if prof is not None and profile is not None:
                prof.disable()
                prof.dump_stats(profile)
                pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
                profile = None
            out["steady_tick_cpu_ms"] = 1000 * (time.process_time() - t0) / ticks
            # A registration: the tick that places it (it re-reads every worker's record).
            took = []
            for i in range(5):
                await store.register_model(ModelSpec(alias=f"fresh-{i}", model_name="org/fresh",
                                                     engine="vllm"))
                t0 = time.perf_counter()
                await sched.tick()
                took.append(time.perf_counter() - t0)
                assert await store.targets_of(f"fresh-{i}"), "not placed in one tick"
            out["registration_tick_ms"] = [round(1000 * t, 1) for t in took]
        if profile is not None:
            prof = cProfile.Profile()
            prof.enable()
            await sched.reconcile()
            prof.disable()
            prof.dump_stats(profile)
            pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(30)
        await sched.release()
        return out
    finally:
        await store.close()


async def reads(url: str, aliases: int, rounds: int = 3) -> list[dict[str, float]]:
    store = Store(connect(url), Keys(PREFIX))
    r = store.r
    try:
        await populate(store, Scale("reads", 1, aliases))
        names = [m.spec.alias for m in await store.list_models()]
        keys = [k for a in names for k in (store.k.model(a), store.k.hold(a))]
        out = []
        for _ in range(rounds):
            c0, t0 = await _redis_cpu(r), time.perf_counter()
            piped: list[Any] = []
            for j in range(0, len(keys), 1000):
                async with r.pipeline(transaction=False) as pipe:
                    for n, k in enumerate(keys[j:j + 1000]):
                        (pipe.hgetall if n % 2 == 0 else pipe.get)(k)
                    piped += await pipe.execute(raise_on_error=False)
            c1, t1 = await _redis_cpu(r), time.perf_counter()
            scripted = await store._reads(keys, ("HGETALL", "GET"))
            c2, t2 = await _redis_cpu(r), time.perf_counter()
            assert scripted == piped, "the script's answers differ from the commands'"
            out.append({"keys": len(keys),
                        "pipelined_redis_us_per_key": 1e6 * (c1 - c0) / len(keys),
                        "pipelined_client_s": t1 - t0,
                        "script_redis_us_per_key": 1e6 * (c2 - c1) / len(keys),
                        "script_client_s": t2 - t1})
            print(json.dumps(out[-1]), flush=True)
        return out
    finally:
        await store.close()


async def _redis_cpu(r: Any) -> float:
    info = await r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--aliases", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--reads", action="store_true")
    ap.add_argument("--ticks", type=int, default=0,
                    help="then time this many steady ticks (CPU ms per tick; profiled with "
                         "--profile instead of a full pass)")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-fullpass-"))
    children = Children(run_dir / "logs")
    try:
        url, _ = start_redis(children, run_dir / "redis")
        if args.reads:
            asyncio.run(reads(url, args.aliases))
        else:
            scale = Scale(f"{args.aliases}x{args.workers}", args.workers, args.aliases)
            print(json.dumps(asyncio.run(passes(url, scale, args.passes, args.profile,
                                                    args.ticks))))
    finally:
        children.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
