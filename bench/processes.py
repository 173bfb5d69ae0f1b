"""A router on every core: ROUTER_PROCESSES=2 against ROUTER_PROCESSES=1, same pool, same run.

    .venv/bin/python -m bench.processes [--duration S] [--repeat N] [--json PATH]

Starts redis-server, manager, worker (with its zero-latency sim engine) and two routers in
front of them: one with ROUTER_PROCESSES=1, one with ROUTER_PROCESSES=2, both pinned to the
same two "router cores" with taskset. Then measures plain chat completions through each with
wrk at 16 and 64 connections, the two routers interleaved within every repetition (a
different one first each time), and prints req/s (median of the repetitions), p50/p99 and the
router's CPU time per request, and the ratio of the two.

Pinning (printed with the results): with 5 or more usable cores, wrk gets the first, the
routers the next two, and the pool (worker, engine, redis-server, manager) the rest, so the
router is the only thing on its cores and the ratio measures the router alone. With fewer
cores the router's two cores are every core, shared with wrk and the pool: the ratio is then
bounded by what the rest leaves free and is not the goal's figure (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import cpu
from bench.points import body
from bench.pool import ALIASES, Pool, register_models, service_env
from bench.procset import (
    PYTHON,
    Children,
    free_port,
    interruptible,
    need,
    run_to_end,
    wait_http,
    wait_tcp,
)
from bench.wrkload import WrkResult, parse, write_script

CONCURRENCY = (16, 64)
_PATH = "/v1/chat/completions"


def layout(cpus: list[int]) -> dict[str, list[int]]:
    """Cores for the load generator, the routers and the rest of the pool."""
    if len(cpus) >= 5:
        return {"load": cpus[:1], "router": cpus[1:3], "pool": cpus[3:]}
    if len(cpus) >= 2:
        return {"load": cpus[:1], "router": cpus[:2], "pool": cpus[-1:]}
    return {"load": cpus, "router": cpus, "pool": cpus}


def pinned(cores: list[int], argv: list[str]) -> list[str]:
    taskset = need("taskset", "apt-get install util-linux")
    return [taskset, "-c", ",".join(map(str, cores)), *argv]


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def start(children: Children, run_dir: Path, cores: dict[str, list[int]]
          ) -> tuple[Pool, dict[str, str], dict[str, list[int]]]:
    """The pool, and ``{"1": url, "2": url}`` of the two routers with their process groups."""
    redis_bin = need("redis-server", "apt-get install redis-server")
    port = free_port()
    (run_dir / "redis").mkdir(parents=True)
    proc = children.start("redis", pinned(cores["pool"], [
        redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
        "no", "--dir", str(run_dir / "redis")]))
    wait_tcp(port, proc, children.log("redis"), 10)
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = service_env(redis_url, run_dir / "state")
    pool = Pool(redis_url, {}, {"redis": proc.pid})
    routers: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    for name, n in (("manager", None), ("worker", None), ("router", "1"), ("router", "2")):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        upper = name.upper()
        e = dict(env) | {f"{upper}_HOST": "127.0.0.1", f"{upper}_PORT": str(port)}
        if name == "worker":
            e["WORKER_URL"] = url
        label = name if n is None else f"router-{n}"
        if n is not None:
            e["ROUTER_PROCESSES"] = n
        where = cores["router"] if n is not None else cores["pool"]
        p = children.start(label, pinned(where, [PYTHON, "-m", f"services.{name}.main"]), e)
        wait_http(f"{url}/health", p, children.log(label), 60)
        pool.pids[label] = p.pid
        if n is None:
            pool.urls[name] = url
        else:
            routers[n] = url
            want = 0 if n == "1" else int(n)  # one process runs alone, no supervisor
            deadline = time.monotonic() + 30
            while len(_children_of(p.pid)) < want and time.monotonic() < deadline:
                time.sleep(0.1)
            # The supervisor and each of its processes lead their own process groups.
            groups[n] = [p.pid, *_children_of(p.pid)]
    pool.urls["router"] = routers["1"]
    return pool, routers, groups


def wrk(children: Children, cores: list[int], url: str, script: Path, connections: int,
        duration_s: int) -> WrkResult:
    argv = [need("wrk", "apt-get install wrk"), "-t1", f"-c{connections}", f"-d{duration_s}s",
            "--timeout", "10s", "--latency", "-s", str(script), url]
    return parse(run_to_end(children, "wrk", pinned(cores, argv), duration_s + 30))


def measure(children: Children, routers: dict[str, str], groups: dict[str, list[int]],
            cores: dict[str, list[int]], run_dir: Path, duration_s: int, repeat: int
            ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    script = write_script(run_dir / "chat.lua", body("sim0", stream=False))
    order = list(routers)
    for n in order:  # warm both: connection pools, caches
        wrk(children, cores["load"], routers[n] + _PATH, script, 16, 1)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(repeat):
        for c in CONCURRENCY:
            for n in order[rep % 2:] + order[:rep % 2]:
                before = cpu.snapshot({"router": groups[n]})
                r = wrk(children, cores["load"], routers[n] + _PATH, script, c, duration_s)
                used = cpu.delta(before, cpu.snapshot({"router": groups[n]}))["router"]
                sample = r.as_dict() | {
                    "router_cpu_us": used * 1e6 / r.requests if r.requests else 0.0}
                out.setdefault(f"c{c}", {}).setdefault(n, []).append(sample)
                print(f"  rep {rep + 1} c={c} ROUTER_PROCESSES={n}: {r.rps:,.0f} req/s, "
                      f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, router CPU "
                      f"{sample['router_cpu_us']:.0f} us/req, errors {r.errors}",
                      file=sys.stderr, flush=True)
    return out


def table(raw: dict[str, dict[str, list[dict[str, Any]]]], cores: dict[str, list[int]]
          ) -> str:
    def med(samples: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(s[key] for s in samples))

    lines = [f"pinning: wrk on cores {cores['load']}, routers on {cores['router']}, "
             f"pool (worker, engine, redis, manager) on {cores['pool']}", "",
             "| connections | ROUTER_PROCESSES=1 req/s (p50, p99 ms) | "
             "ROUTER_PROCESSES=2 req/s (p50, p99 ms) | ratio | router CPU us/req 1 / 2 |",
             "|---|---|---|---|---|"]
    for point, by in raw.items():
        one, two = by["1"], by["2"]
        r1, r2 = med(one, "rps"), med(two, "rps")
        lines.append(
            f"| {point[1:]} | {r1:,.0f} ({med(one, 'p50_ms'):.2f}, {med(one, 'p99_ms'):.2f}) "
            f"| {r2:,.0f} ({med(two, 'p50_ms'):.2f}, {med(two, 'p99_ms'):.2f}) "
            f"| {r2 / r1:.2f}x | {med(one, 'router_cpu_us'):.0f} / "
            f"{med(two, 'router_cpu_us'):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.processes",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per point (5)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (3)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw samples here")
    args = ap.parse_args(argv)
    cores = layout(sorted(os.sched_getaffinity(0)))
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-bench-procs-"))
    children = Children(run_dir / "logs")
    ok = False
    try:
        with interruptible():
            pool, routers, groups = start(children, run_dir, cores)
            register_models(pool)
            # Both routers must see the models before the first point.
            for url in routers.values():
                for alias in ALIASES:
                    b = body(alias, stream=False)
                    httpx.post(url + _PATH, json=b, timeout=30).raise_for_status()
            raw = measure(children, routers, groups, cores, run_dir, args.duration,
                          args.repeat)
        print(table(raw, cores))
        if args.json is not None:
            args.json.write_text(json.dumps({"cores": cores, "raw": raw}, indent=1))
        ok = True
    finally:
        children.stop_all()
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
