"""Prefix-aware balancing vs plain least outstanding: prefix-cache hit rate and latency.

One pool (redis, manager, two workers) and two routers on it, one with prefix-aware balancing
(PREFIX_AFFINITY_CHARS=256) and one without (0). Each router serves its own alias of two
simulated replicas (one per worker), so the two modes never share a prefix cache. The same
workload goes to both, interleaved batch by batch: 8 shared system prompts of ~1,400
characters, each request one of them (at random) plus its own question. The simulated engine
counts prefix-cache hits as vLLM does (``vllm:prefix_cache_hits`` / ``queries``) and a cached
prompt share cuts its time to first token (--ttft 0.2 s; 80 % of it is prefill). Run for a
cache that holds every prompt on every replica and for one that holds 3/4 of them.

    .venv/bin/python -m bench.prefix [--requests 400] [--concurrency 8] [--no-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.docs import replace_block
from bench.pool import service_env, start_redis
from bench.procset import (
    PYTHON,
    SERVER_CORE,
    Children,
    free_port,
    interruptible,
    pinned,
    wait_http,
)

SYSTEMS = [" ".join(f"Rule {i}.{k}: answer as assistant {i} would, citing policy {k * i}."
                    for k in range(24)) for i in range(8)]
ENGINE_ARGS = ["--ttft", "0.2", "--itl", "0.002"]
MODES = {"prefix-aware": "256", "least-outstanding": "0"}


def start(children: Children, run_dir: Path) -> dict[str, str]:
    """redis, manager, workers w1 and w2, and one router per mode: name -> base URL."""
    redis_url, _ = start_redis(children, run_dir / "redis")
    urls: dict[str, str] = {}
    names: list[tuple[str, str, dict[str, str]]] = [
        ("manager", "manager", {}), ("w1", "worker", {}), ("w2", "worker", {}),
        *[(mode, "router", {"PREFIX_AFFINITY_CHARS": c}) for mode, c in MODES.items()]]
    for name, service, extra in names:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = service_env(redis_url, run_dir / f"state-{name}") | extra | {
            f"{service.upper()}_HOST": "127.0.0.1", f"{service.upper()}_PORT": str(port),
            "WORKER_ID": name, "WORKER_URL": url,
            # Engines on loopback ports: the bench reads their counters over TCP.
            "ENGINE_SOCKETS": "tcp"}
        proc = children.start(name, pinned(SERVER_CORE, [PYTHON, "-m",
                                                         f"services.{service}.main"]), env)
        wait_http(f"{url}/health", proc, children.log(name), 60)
        urls[name] = url
    return urls


def engines(router: str, alias: str) -> list[str]:
    status = httpx.get(f"{router}/admin/status", timeout=10).json()
    for model in status["models"]:
        if model["alias"] == alias:
            return [f"http://127.0.0.1:{i['port']}" for i in model["instances"]
                    if i.get("state") == "RUNNING"]
    return []


def register(router: str, alias: str, cache_blocks: int) -> list[str]:
    spec = {"alias": alias, "model_name": f"sim/{alias}", "engine": "sim", "replicas": 2,
            "extra_args": [*ENGINE_ARGS, "--prefix-cache-blocks", str(cache_blocks)]}
    httpx.post(f"{router}/admin/models/register", json=spec, timeout=10).raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = engines(router, alias)
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise SystemExit(f"{alias}: two replicas not running after 60 s")


def counters(urls: list[str]) -> tuple[float, float]:
    """(hits, queries) summed over the engines."""
    hits = queries = 0.0
    for url in urls:
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total{"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total{"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def workload(n: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "system", "content": rng.choice(SYSTEMS)},
             {"role": "user", "content": f"Question {q}: " + " ".join(
                 rng.choice(("why", "how", "when", "where", "which")) for _ in range(30))}]
            for q in range(n)]


async def run_batch(client: httpx.AsyncClient, router: str, alias: str,
                    batch: list[list[dict[str, str]]], concurrency: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def one(messages: list[dict[str, str]]) -> None:
        async with gate:
            t0 = time.perf_counter()
            r = await client.post(f"{router}/v1/chat/completions", json={
                "model": alias, "messages": messages, "max_tokens": 4})
            r.raise_for_status()
            times.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(m) for m in batch))
    return times


async def measure(urls: dict[str, str], aliases: dict[str, str], replicas: dict[str, list[str]],
                  requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    work = workload(requests, seed=7)
    before = {mode: counters(replicas[mode]) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with httpx.AsyncClient(timeout=60) as client:
        for start_at in range(0, requests, 50):  # interleaved: both see the same noise
            for mode in MODES:
                times[mode] += await run_batch(client, urls[mode], aliases[mode],
                                               work[start_at:start_at + 50], concurrency)
    out = {}
    for mode in MODES:
        hits, queries = counters(replicas[mode])
        hit_rate = (hits - before[mode][0]) / max(1.0, queries - before[mode][1])
        ms = sorted(t * 1000 for t in times[mode])
        out[mode] = {"hit_rate": hit_rate, "p50_ms": statistics.median(ms),
                     "mean_ms": statistics.fmean(ms),
                     "p95_ms": ms[int(0.95 * (len(ms) - 1))]}
    return out


def table(results: dict[int, dict[str, dict[str, float]]], requests: int,
          concurrency: int) -> str:
    lines = [f"{requests} chat requests per mode, {concurrency} concurrent, 8 system prompts "
             "(~1,400 characters, 21 blocks) + a unique question, 2 simulated replicas "
             f"({' '.join(ENGINE_ARGS)}); `python -m bench.prefix`.", "",
             "| prefix cache per replica | balancing | prefix-cache hit rate | p50 | mean | p95 |",
             "|---|---|---|---|---|---|"]
    for blocks, by_mode in results.items():
        for mode, r in by_mode.items():
            lines.append(f"| {blocks} blocks | {mode} | {r['hit_rate']:.1%} | "
                         f"{r['p50_ms']:.1f} ms | {r['mean_ms']:.1f} ms | "
                         f"{r['p95_ms']:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    # Tight: 128 of the 8 prompts' ~170 blocks fit per replica; ample: all of them.
    parser.add_argument("--cache-blocks", default="128,4096")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.cache_blocks.split(",")]
    run_dir = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    children = Children(run_dir)
    results: dict[int, dict[str, dict[str, float]]] = {}
    with interruptible():
        try:
            urls = start(children, run_dir)
            for blocks in sizes:
                aliases = {mode: f"{mode.split('-')[0]}{blocks}" for mode in MODES}
                replicas = {mode: register(urls[mode], aliases[mode], blocks) for mode in MODES}
                results[blocks] = asyncio.run(measure(urls, aliases, replicas, args.requests,
                                                      args.concurrency))
        finally:
            children.stop_all()
    text = table(results, args.requests, args.concurrency)
    print(text)
    if not args.no_docs:
        replace_block("prefix", text)


if __name__ == "__main__":
    main()
