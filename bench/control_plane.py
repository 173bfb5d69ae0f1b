"""Control-plane scale: many workers and aliases in one Redis, at full and at 1/10 scale.

In process, against a real redis-server: the manager's reconcile pass (the real
``Scheduler``) and the router's route refresh (the real ``RouteTable``). Then live: simulated
workers heartbeating and reconciling (bench.simworkers), plus the real manager, router and
worker processes, added one at a time to attribute Redis commands/s to each; their CPU and
memory are read from /proc. Comparing the two scales shows what grows worse than linearly:
with workers and aliases both x10, a linear cost grows x10 and one in workers x aliases x100.

The models use engine "vllm" on workers that say they have it, so the real worker (engine
"sim" only) is never given one: nothing starts thousands of engines if a heartbeat lapses.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
import uvloop

from bench import cpu
from bench.cp_report import markdown
from bench.pool import service_env, start_redis, start_redis_cluster
from bench.procset import LOAD_CORE, PYTHON, SERVER_CORE, Children, free_port, pinned, wait_http
from bench.simworkers import worker_id
from services.manager.scheduler import Scheduler
from services.router.routes import RouteTable
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec, WorkerRegistration
from shared.settings import ManagerSettings
from shared.store import NotLeader, Store, connect

__all__ = ["SCALES", "markdown", "run"]

PREFIX = "cp"
T = TypeVar("T")


@dataclass(frozen=True)
class Scale:
    label: str
    workers: int
    aliases: int


SCALES = (Scale("1/10", 50, 500), Scale("full", 500, 5000))
# In process only: one dimension at a time, to tell a cost in workers x aliases from one in
# either alone.
CROSS = (Scale("workers/10", 50, 5000), Scale("aliases/10", 500, 500))


async def _batched(coros: list[Coroutine[Any, Any, T]], size: int = 50) -> list[T]:
    """Run in groups, so the client pool never opens thousands of connections."""
    out: list[T] = []
    for i in range(0, len(coros), size):
        out += await asyncio.gather(*coros[i:i + size])
    return out


async def _timed(make: Callable[[], Awaitable[object]], times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        await make()
        out.append(time.perf_counter() - t0)
    return out


def _alias(i: int) -> str:
    return f"model-{i:05d}"


async def populate(store: Store, scale: Scale) -> float:
    t0 = time.perf_counter()
    regs = [WorkerRegistration(worker_id=worker_id(i), url=f"http://10.0.{i // 250}.{i % 250}:7000",
                               engines=["vllm"], gpu_message="simulated", version="bench")
            for i in range(scale.workers)]
    await _batched([store.register_worker(r, 3600) for r in regs])
    specs = [ModelSpec(alias=_alias(i), model_name=f"org/model-{i}", engine="vllm")
             for i in range(scale.aliases)]
    await _batched([store.register_model(s) for s in specs])
    return time.perf_counter() - t0


async def report_running(store: Store, workers: list[str]) -> None:
    """What each worker writes once its instances serve: the record and the route."""
    assigns = await store.assignments(workers)
    now = repr(time.time())
    record = {"state": "RUNNING", "target": "running", "engine": "vllm", "inflight": "0",
              "last_request_at": now, "active_at": now, "updated_at": now, "port": "8001"}

    async def one(alias: str, w: str) -> None:
        await store.put_instance(alias, w, record)
        await store.set_route(alias, w, f"http://{w}:7000")

    await _batched([one(a, w) for w, mine in assigns.items() for a in mine])


async def scheduler_passes(store: Store, scale: Scale, passes: int) -> dict[str, float]:
    # A long lease: the first pass may outlast the default 5 s TTL (reported, not hidden).
    settings = ManagerSettings(manager_id="bench-control-plane", lease_ttl_s=3600)
    scheduler = Scheduler(store, settings, Nudger(store))
    t0 = time.perf_counter()
    await scheduler.tick()  # takes the lease and places every alias
    placement = time.perf_counter() - t0
    await report_running(store, [worker_id(i) for i in range(scale.workers)])
    steady = await _timed(scheduler.reconcile, passes)
    await scheduler.release()
    return {"placement_pass_s": placement, "reconcile_pass_s": statistics.median(steady),
            "reconcile_pass_max_s": max(steady)}


async def default_lease_pass(redis_url: str, scale: Scale,
                             cluster_nodes: str | None = None) -> dict[str, float]:
    """The first pass again, on a fresh key prefix, with the default lease TTL: how much it
    placed before the lease ran out (a real manager renews the lease only between passes)."""
    store = Store(connect(redis_url, cluster_nodes=cluster_nodes), Keys(PREFIX + "-lease"))
    settings = ManagerSettings(manager_id="bench-default-lease")
    scheduler = Scheduler(store, settings, Nudger(store))
    try:
        await populate(store, scale)
        t0 = time.perf_counter()
        try:
            await scheduler.tick()
            lost = 0.0
        except NotLeader:
            lost = 1.0
        elapsed = time.perf_counter() - t0
        assigns = await store.assignments([worker_id(i) for i in range(scale.workers)])
    finally:
        await store.close()
    return {"default_lease_ttl_s": settings.lease_ttl_s, "default_lease_lost": lost,
            "default_lease_pass_s": elapsed,
            "default_lease_placed": float(sum(len(a) for a in assigns.values()))}


async def route_refreshes(store: Store, passes: int) -> dict[str, float]:
    table = RouteTable(store, Nudger(store), 1.0)
    first = await _timed(table.refresh, 1)
    steady = await _timed(table.refresh, passes)

    async def after(change: Callable[[], Awaitable[object]]) -> float:
        await change()  # the write itself is not the router's cost
        return (await _timed(table.refresh, 1))[0]

    served = sorted((a, w, u) for a, r in table.routes.items() for w, u in r.items())
    # A route change as workers write it (version bump and routes-log entry): a worker
    # re-publishing its route, one alias per pass.
    routes = [await after(functools.partial(store.set_route, a, w, u))
              for a, w, u in served[:passes]]
    # The version bumped with no log entry (an older writer, a dead worker's cleanup): the
    # router cannot tell what changed and reloads every alias.
    unlogged = [await after(lambda: store.r.incr(store.k.routes_version))
                for _ in range(passes)]
    return {"route_refresh_first_s": first[0], "route_refresh_steady_s": statistics.median(steady),
            "route_refresh_routes_changed_s": statistics.median(routes),
            "route_refresh_unlogged_change_s": statistics.median(unlogged)}


async def in_process(redis_url: str, scale: Scale, passes: int,
                     cluster_nodes: str | None = None) -> dict[str, float]:
    store = Store(connect(redis_url, cluster_nodes=cluster_nodes), Keys(PREFIX))
    try:
        out = {"populate_s": await populate(store, scale)}
        out |= await scheduler_passes(store, scale, passes)
        out |= await route_refreshes(store, passes)
    finally:
        await store.close()
    return out | await default_lease_pass(redis_url, scale, cluster_nodes)


def _commands(r: redis.Redis) -> tuple[int, dict[str, int], dict[str, int]]:
    """Commands processed, and calls and µs spent (inside Redis, per INFO commandstats) by
    command."""
    stats = r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}
    return int(r.info("stats")["total_commands_processed"]), calls, usec


def _sim_ticks(path: Path) -> dict[str, float]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _kept_up(before: dict[str, float], after: dict[str, float]) -> float:
    """Share of the simulated workers' due ticks done in between (1.0: it kept up)."""
    keys = ("heartbeats", "reconciles")
    done = sum(after.get(k, 0) - before.get(k, 0) for k in keys)
    due = sum(after.get(f"{k}_due", 0) - before.get(f"{k}_due", 0) for k in keys)
    return done / due if due else 0.0


def _stage(
    r: redis.Redis, groups: dict[str, list[int]], seconds: float, sim_out: Path
) -> dict[str, Any]:
    """Redis commands/s (total and the busiest commands) and CPU busy of each process."""
    total0, calls0, usec0 = _commands(r)
    cpu0 = cpu.snapshot(groups)
    ticks0 = _sim_ticks(sim_out)
    time.sleep(seconds)
    total1, calls1, usec1 = _commands(r)
    kept_up = _kept_up(ticks0, _sim_ticks(sim_out))
    used = cpu.delta(cpu0, cpu.snapshot(groups))
    rates = {c: (n - calls0.get(c, 0)) / seconds for c, n in calls1.items()}
    top = dict(sorted(((c, v) for c, v in rates.items() if v > 0), key=lambda kv: -kv[1])[:6])
    # Where Redis's time goes (execution only: reading, parsing and replying are not in it).
    spent = {c: (n - usec0.get(c, 0)) / seconds / 1e6 for c, n in usec1.items()}
    busiest = dict(sorted(((c, round(v, 4)) for c, v in spent.items() if v > 0),
                          key=lambda kv: -kv[1])[:6])
    return {"commands_per_s": (total1 - total0) / seconds, "top_commands_per_s": top,
            "top_commands_busy": busiest,
            "simulator_kept_up": kept_up,
            "cpu_busy": {n: s / seconds for n, s in used.items()}}


def _start_service(children: Children, name: str, env: dict[str, str]) -> int:
    port = free_port()
    env = env | {f"{name.upper()}_HOST": "127.0.0.1", f"{name.upper()}_PORT": str(port),
                 "WORKER_URL": f"http://127.0.0.1:{port}"}
    argv = pinned(SERVER_CORE, [PYTHON, "-m", f"services.{name}.main"])
    proc = children.start(f"cp-{name}", argv, env)
    wait_http(f"http://127.0.0.1:{port}/health", proc, children.log(f"cp-{name}"), 120)
    return proc.pid


def live(
    children: Children, redis_url: str, redis_pid: int, scale: Scale, stage_s: float,
    run_dir: Path,
) -> dict[str, Any]:
    env = service_env(redis_url, run_dir / "state") | {"REDIS_PREFIX": PREFIX,
                                                       "WORKER_ID": "real-worker"}
    settle_s = 3.0
    sim_out = run_dir / f"simworkers-{scale.workers}.json"
    sim_argv = [PYTHON, "-m", "bench.simworkers", "--redis", redis_url, "--prefix", PREFIX,
                "--workers", str(scale.workers), "--out", str(sim_out),
                "--duration", str(4 * (stage_s + settle_s) + 60)]
    sim = children.start("simworkers", pinned(LOAD_CORE, sim_argv))
    groups: dict[str, list[int]] = {"redis": [redis_pid], "simworkers": [sim.pid]}
    r = redis.Redis.from_url(redis_url)
    stages: dict[str, Any] = {}
    try:
        for name in ("simulated workers", "manager", "router", "worker"):
            if name != "simulated workers":
                groups[name] = [_start_service(children, name, env)]
            time.sleep(settle_s)
            label = name if name.startswith("sim") else f"+ {name}"
            stages[label] = _stage(r, groups, stage_s, sim_out)
        memory = {n: cpu.group_rss_mb(p[0]) for n, p in groups.items()}
        memory["redis used_memory"] = int(r.info("memory")["used_memory"]) / 2**20
    finally:
        r.close()
        children.stop(sim)
    return {"stages": stages, "rss_mb": memory}


def timed_in_process(redis_url: str, scale: Scale, passes: int,
                     cluster_nodes: str | None = None) -> dict[str, float]:
    """The in-process timings with this process on the load core, Redis on the server core:
    the Python side and Redis do not compete for one core (as the real manager and Redis
    would not on a larger machine)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CORE})
    try:
        return uvloop.run(in_process(redis_url, scale, passes, cluster_nodes))
    finally:
        os.sched_setaffinity(0, before)


def run_scale(scale: Scale, quick: bool, with_live: bool = True) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-cp-"))
    children = Children(run_dir / "logs")
    try:
        redis_url, redis_pid = start_redis(children, run_dir / "redis")
        out: dict[str, Any] = timed_in_process(redis_url, scale, 3 if quick else 5)
        if with_live:
            out |= live(children, redis_url, redis_pid, scale, 3 if quick else 6, run_dir)
    except BaseException:
        print(f"control plane: logs kept in {run_dir / 'logs'}")
        raise
    finally:
        children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scale in (*SCALES, *CROSS):
        print(f"  control plane at {scale.label} scale: {scale.workers} workers, "
              f"{scale.aliases} aliases", flush=True)
        results[scale.label] = {"workers": scale.workers, "aliases": scale.aliases,
                                **run_scale(scale, quick, with_live=scale in SCALES)}
    return results


# What the cluster comparison reports: each timing on the cluster over the same on one Redis.
CLUSTER_COMPARED = ("populate_s", "placement_pass_s", "reconcile_pass_s",
                    "route_refresh_first_s", "route_refresh_steady_s",
                    "route_refresh_routes_changed_s", "route_refresh_unlogged_change_s")


def cluster_vs_single(scale: Scale = SCALES[0], rounds: int = 3, passes: int = 10
                      ) -> dict[str, Any]:
    """The in-process timings on one redis-server and on a local 3-primary Redis Cluster
    (all on the server core), alternated ``rounds`` times in one run, ``passes`` timed
    passes each (medians); per backend the best round, and the cluster / single ratio."""
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-cp-cluster-"))
    children = Children(run_dir / "logs")
    got: dict[str, list[dict[str, float]]] = {"single": [], "cluster": []}
    try:
        for i in range(rounds):
            for backend in ("single", "cluster"):
                data = run_dir / f"{backend}-{i}"
                if backend == "single":
                    url, _ = start_redis(children, data)
                    got[backend].append(timed_in_process(url, scale, passes))
                else:
                    nodes = start_redis_cluster(children, data)
                    got[backend].append(timed_in_process("", scale, passes, nodes))
                children.stop_all()
    finally:
        children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    # The best round of each: on a shared machine noise only ever adds time.
    best = {b: {k: min(r[k] for r in runs) for k in CLUSTER_COMPARED} for b, runs in got.items()}
    return {"workers": scale.workers, "aliases": scale.aliases, "rounds": rounds,
            "passes": passes, **best,
            "ratio": {k: best["cluster"][k] / best["single"][k] for k in CLUSTER_COMPARED}}


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--cluster-vs-single"]:
        print(json.dumps(cluster_vs_single(), indent=1))
    else:
        print(json.dumps(run(quick=True), indent=1))
