"""The incremental control plane at scale (issue 15), before and after in one run.

    python -m bench.cp_scale [--base DIR] [--scales 5000x500,50000x500,5000x5000]
                             [--steady 10] [--probes 8] [--out FILE]

For each scale (aliases x workers) and each code tree (this checkout, and with ``--base`` an
older one, e.g. ``git worktree add /tmp/base main``): a fresh redis-server, the workers and
models registered, simulated workers (bench.simworkers, 1,000 per process, each doing what
that tree's worker does) and that tree's real manager process. Once every alias is placed and
its instance reported RUNNING, a steady window measures the manager's and Redis's CPU (from
/proc) and Redis commands/s by command; then probes measure how long the manager takes to act
on a registration (until the fenced write placing it) and on a dead worker (from when its
heartbeat key expires, the worker having stopped beating, until its model is placed
elsewhere), p50 and max. Last, with the manager stopped,
a full pass of that tree's scheduler is timed in a process of its own (the full resync).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
import uvloop

from bench.control_plane import Scale, _stage, populate, report_running
from bench.pool import service_env, start_redis
from bench.procset import LOAD_CORE, PYTHON, SERVER_CORE, Children, free_port, pinned, wait_http
from bench.simworkers import worker_id
from shared.keys import Keys
from shared.models import ModelSpec, WorkerRegistration
from shared.store import Store, connect

PREFIX = "cps"
HERE = Path(__file__).resolve().parent.parent
SIM_PER_PROCESS = 1000
# The dead-worker probe's victims beat with this TTL (a real worker's is HEARTBEAT_TTL_S, 6 s):
# short, so a probe waits little for the death to land.
VICTIM_TTL_S = 1.5

# A full pass of a code tree's scheduler, in a process whose imports come from that tree.
_PASS_CODE = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from services.manager.scheduler import Scheduler
from shared.events import Nudger
from shared.keys import Keys
from shared.settings import ManagerSettings
from shared.store import Store, connect

async def main():
    store = Store(connect(sys.argv[2]), Keys(sys.argv[3]))
    s = Scheduler(store, ManagerSettings(manager_id='bench-resync', lease_ttl_s=3600),
                  Nudger(store))
    await s.tick()
    out = []
    for _ in range(int(sys.argv[4])):
        t0 = time.perf_counter()
        await s.reconcile()
        out.append(time.perf_counter() - t0)
    await s.release()
    await store.close()
    print(json.dumps(out))

asyncio.run(main())
"""

# A tree's module run as __main__ with that tree first on the path.
_RUN_CODE = ("import runpy, sys; tree, module = sys.argv[1:3]; sys.path.insert(0, tree); "
             "sys.argv[:] = [module, *sys.argv[3:]]; "
             "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def _module(tree: Path, module: str, *args: str) -> list[str]:
    return [PYTHON, "-c", _RUN_CODE, str(tree), module, *args]


async def _placed(store: Store, workers: list[str]) -> int:
    async with store.r.pipeline(transaction=False) as pipe:
        for w in workers:
            pipe.hlen(store.k.assign(w))
        return sum(int(n) for n in await pipe.execute())


class Hints:
    """Waits for the fenced write naming an alias (the hint it publishes when it lands)."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.keys = keys
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.keys.events)
        self.task = asyncio.create_task(self._listen(pubsub))

    async def _listen(self, pubsub: Any) -> None:
        async for msg in pubsub.listen():
            now = time.perf_counter()
            try:
                hint = orjson.loads(msg["data"])
            except orjson.JSONDecodeError:
                continue
            fut = self.waiting.get(str(hint.get("alias")))
            if hint.get("kind") == "assign" and fut is not None and not fut.done():
                fut.set_result(now)

    def expect(self, alias: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[alias] = fut
        return fut

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.client.aclose()


def _spec(alias: str) -> ModelSpec:
    return ModelSpec(alias=alias, model_name=f"org/{alias}", engine="vllm")


async def beat_as_victim(store: Store, worker: str, beats: list[float]) -> None:
    """A victim worker's heartbeat: its key set with VICTIM_TTL_S every third of it; the
    start time of each beat kept."""
    while True:
        beats.append(time.perf_counter())
        await store.r.set(store.k.worker_alive(worker), repr(time.time()),
                          px=int(VICTIM_TTL_S * 1000))
        await asyncio.sleep(VICTIM_TTL_S / 3)


async def probes(url: str, count: int) -> dict[str, Any]:
    """Registration-to-action and dead-worker-to-action, ``count`` of each, seconds."""
    store = Store(connect(url), Keys(PREFIX))
    hints = Hints(url, store.k)
    await hints.start()
    reg: list[float] = []
    dead: list[float] = []
    missed = 0
    try:
        for i in range(count):
            await asyncio.sleep(random.uniform(0.2, 1.2))  # any phase of the manager's timer
            alias = f"probe-{i}"
            got = hints.expect(alias)
            t0 = time.perf_counter()
            await store.register_model(_spec(alias))
            reg.append(await asyncio.wait_for(got, 60) - t0)
        for i in range(count):
            victim = f"victim-{i}"
            await store.register_worker(WorkerRegistration(
                worker_id=victim, url=f"http://{victim}:1", engines=["vllm"],
                gpu_message="simulated", version="bench"), 3600)
            beats: list[float] = []
            beating = asyncio.create_task(beat_as_victim(store, victim, beats))
            try:
                await asyncio.sleep(2.0)  # seen by the manager (an empty worker: placed first)
                alias = f"victim-model-{i}"
                got = hints.expect(alias)
                await store.register_model(_spec(alias))
                await asyncio.wait_for(got, 60)
                if not await store.r.hexists(store.k.assign(victim), alias):
                    missed += 1  # placed elsewhere: nothing to measure
                    continue
                await asyncio.sleep(random.uniform(0.2, 1.2))
            finally:
                beating.cancel()
            # The victim stops beating: its death lands when its heartbeat key expires,
            # VICTIM_TTL_S after the last beat began (as a worker's does).
            got = hints.expect(alias)
            landed = beats[-1] + VICTIM_TTL_S
            dead.append(await asyncio.wait_for(got, 60) - landed)
    finally:
        await hints.close()
        await store.close()

    def summary(xs: list[float]) -> dict[str, Any]:
        return {"p50_ms": statistics.median(xs) * 1000, "max_ms": max(xs) * 1000,
                "n": float(len(xs)), "each_ms": [round(x * 1000) for x in xs]} if xs else {}

    return {"registration": summary(reg), "dead_worker": summary(dead),
            "dead_worker_not_on_victim": missed}


async def _prepare(url: str, scale: Scale) -> float:
    store = Store(connect(url), Keys(PREFIX))
    try:
        return await populate(store, scale)
    finally:
        await store.close()


async def _wait_placed(url: str, scale: Scale, timeout_s: float) -> float:
    store = Store(connect(url), Keys(PREFIX))
    ids = [worker_id(i) for i in range(scale.workers)]
    t0 = time.perf_counter()
    try:
        while await _placed(store, ids) < scale.aliases:
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"not every alias placed within {timeout_s:.0f} s")
            await asyncio.sleep(1.0)
        await report_running(store, ids)
    finally:
        await store.close()
    return time.perf_counter() - t0


def _probed(url: str, probe_count: int, run_dir: Path) -> dict[str, Any]:
    try:
        return uvloop.run(probes(url, probe_count))
    except TimeoutError:  # the logs are kept: they say what the manager did meanwhile
        return {"error": "a probe waited 60 s for its action", "logs": str(run_dir / "logs")}


def run_one(tree: Path, scale: Scale, steady_s: float, probe_count: int,
            sim: str = "tasks") -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-cps-"))
    children = Children(run_dir / "logs")
    out: dict[str, Any] = {"tree": str(tree), "aliases": scale.aliases,
                           "workers": scale.workers}
    try:
        url, redis_pid = start_redis(children, run_dir / "redis")
        out["populate_s"] = uvloop.run(_prepare(url, scale))
        groups: dict[str, list[int]] = {"redis": [redis_pid], "simworkers": []}
        sim_out = run_dir / "sim-0.json"
        # An older tree's simulator has no --first: one process plays every worker there.
        # The fleet simulator (raw pipelined commands, bench/simfleet.py) is the tree's own
        # where it has one: it sends what that tree's workers send (their heartbeats differ).
        split = tree == HERE
        if sim == "fleet":
            fleet = tree if (tree / "bench" / "simfleet.py").exists() else HERE
            argv = _module(fleet, "bench.simfleet", "--redis", url, "--prefix", PREFIX,
                           "--workers", str(scale.workers), "--duration", "3600",
                           "--out", str(sim_out))
            groups["simworkers"].append(children.start("sim-0", pinned(LOAD_CORE, argv)).pid)
        for n in range(0 if sim == "fleet" else
                       math.ceil(scale.workers / SIM_PER_PROCESS) if split else 1):
            first = n * SIM_PER_PROCESS
            count = min(SIM_PER_PROCESS, scale.workers - first) if split else scale.workers
            argv = _module(tree, "bench.simworkers", "--redis", url, "--prefix", PREFIX,
                           "--workers", str(count), "--duration", "3600",
                           "--out", str(run_dir / f"sim-{n}.json"),
                           *(["--first", str(first)] if split else []))
            groups["simworkers"].append(children.start(f"sim-{n}", pinned(LOAD_CORE, argv)).pid)
        port = free_port()
        env = service_env(url, run_dir / "state") | {
            "REDIS_PREFIX": PREFIX, "MANAGER_HOST": "127.0.0.1", "MANAGER_PORT": str(port),
            "MANAGER_ID": "bench-manager", "LEASE_TTL_S": "30", "METRICS": "false"}
        manager = children.start("manager", pinned(SERVER_CORE, _module(
            tree, "services.manager.main")), env)
        wait_http(f"http://127.0.0.1:{port}/health", manager, children.log("manager"), 120)
        groups["manager"] = [manager.pid]
        out["placed_and_running_s"] = uvloop.run(_wait_placed(url, scale, 1800))
        time.sleep(15.0)  # the passes that follow the reports settle (a full one, at least)
        r = redis.Redis.from_url(url)
        try:
            out["steady"] = _stage(r, groups, steady_s, sim_out)
        finally:
            r.close()
        out["probes"] = _probed(url, probe_count, run_dir)
        children.stop(manager)
        passes = subprocess.run([PYTHON, "-c", _PASS_CODE, str(tree), url, PREFIX,
                                 "1" if scale.aliases * scale.workers > 5_000_000 else "3"],
                                check=False, capture_output=True, text=True, timeout=1800)
        if passes.returncode != 0:
            out["full_pass_error"] = passes.stderr[-2000:]
            return out
        times = json.loads(passes.stdout.strip().splitlines()[-1])
        out["full_pass_s"] = statistics.median(times)
        # What the full resyncs cost on average: a pass every max(RESYNC_S, 50 x its
        # duration) (services/manager/scheduler.py); wall time taken as CPU time (an upper
        # bound: the pass also waits on Redis).
        out["resync_every_s"] = max(30.0, 50 * out["full_pass_s"])
        out["resync_share"] = out["full_pass_s"] / out["resync_every_s"]
    except BaseException:
        print(f"cp_scale: logs kept in {run_dir / 'logs'}", flush=True)
        raise
    finally:
        children.stop_all()
    if "error" in out.get("probes", {}):
        print(f"cp_scale: a probe timed out; logs kept in {run_dir / 'logs'}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _parse_scales(text: str) -> list[Scale]:
    out = []
    for item in text.split(","):
        aliases, workers = (int(x) for x in item.lower().split("x"))
        out.append(Scale(item, workers, aliases))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="an older checkout to compare with")
    ap.add_argument("--scales", default="5000x500,50000x500,5000x5000")
    ap.add_argument("--steady", type=float, default=10.0)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sim", choices=("tasks", "fleet"), default="tasks",
                    help="simulated workers: the real store code per worker (bench.simworkers)"
                         " or raw pipelined commands from one process (bench.simfleet), which "
                         "keeps 5,000 workers alive on two cores")
    args = ap.parse_args()
    trees = {"after": HERE} | ({"before": args.base.resolve()} if args.base else {})
    results: dict[str, Any] = {}
    for scale in _parse_scales(args.scales):
        for name, tree in trees.items():
            print(f"cp_scale: {scale.label} ({scale.aliases} aliases x {scale.workers} "
                  f"workers), {name}", flush=True)
            results.setdefault(scale.label, {})[name] = res = run_one(
                tree, scale, args.steady, args.probes, args.sim)
            print(json.dumps(res), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
