"""Fair queueing on one saturated replica: tenant A with 48 concurrent clients, tenant B with 2.

    .venv/bin/python -m bench.fairness [--duration 8] [--json PATH] [--no-docs]

One simulated engine that generates at most 8 sequences at once (``--enforce-max-num-seqs
--max-num-seqs 8``, 10 ms per token, 20 tokens: about 0.2 s a request) serves two aliases in
turn: ``fair`` with ``max_inflight`` 8 (the router queues past it, by tenant fair share) and
``fifo`` without (every request goes to the engine, which serves first come first served).
Each tenant has its own API key. Phases, one after the other:

- idle: B's 2 clients alone (B's latency on an idle replica);
- fair: A's 48 and B's 2 at once on ``fair``;
- fifo: the same on ``fifo`` (what B sees without the router's queue).

Reported per phase: B's p50/p99 latency, each tenant's req/s, and the replica's busy share
(mean running sequences / 8, sampled from the engine). The goal (issue 12): on ``fair``, B's
p50 <= 2x its idle p50 while A keeps the replica busy. Closed-loop clients on the load core;
the servers on the server core (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import docs
from bench.pool import Pool, start_pool
from bench.procset import LOAD_CORE, ROOT, Children, interruptible

SEQS = 8
ENGINE_ARGS = ["--enforce-max-num-seqs", "--max-num-seqs", str(SEQS), "--itl", "0.01"]
MAX_TOKENS = 20
A_CLIENTS, B_CLIENTS = 48, 2
ADMIN = "bench-admin-token"


@dataclass
class Tenant:
    name: str
    clients: int
    key: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.fairness",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fairness.json")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    return ap.parse_args(argv)


def admin(pool: Pool) -> httpx.Client:
    return httpx.Client(base_url=pool.urls["router"], timeout=30,
                        headers={"authorization": f"Bearer {ADMIN}"})


def setup(pool: Pool) -> tuple[dict[str, str], dict[str, str]]:
    """Both aliases serving and one key per tenant; returns the keys and the engine URL."""
    with admin(pool) as client:
        for alias, cap in (("fair", SEQS), ("fifo", None)):
            spec = {"alias": alias, "model_name": "sim/fair", "engine": "sim",
                    "extra_args": ENGINE_ARGS, "max_inflight": cap}
            client.post("/admin/models/register", json=spec).raise_for_status()
        keys = {}
        for tenant in ("A", "B"):
            made = client.post("/admin/keys", json={"name": f"bench-{tenant}",
                                                    "tenant": tenant, "priority": "normal"})
            made.raise_for_status()
            keys[tenant] = str(made.json()["key"])
        return keys, _wait_engines(client)


def _wait_engines(client: httpx.Client, timeout_s: float = 60) -> dict[str, str]:
    """alias -> its engine's URL, once both run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ports = {m["alias"]: int(i["port"]) for m in client.get("/admin/status").json()["models"]
                 for i in m["instances"] if i.get("state") == "RUNNING" and int(i.get("port", 0))}
        if set(ports) == {"fair", "fifo"}:
            return {a: f"http://127.0.0.1:{p}" for a, p in ports.items()}
        time.sleep(0.2)
    raise SystemExit("models not serving in time")


async def client_loop(http: httpx.AsyncClient, alias: str, t: Tenant, until: float,
                      measure_from: float) -> None:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS}
    headers = {"authorization": f"Bearer {t.key}"}
    while (start := time.monotonic()) < until:
        r = await http.post("/v1/chat/completions", json=body, headers=headers)
        if start < measure_from:
            continue  # warm-up: the queue fills during the first second
        if r.status_code == 200:
            t.latencies.append(time.monotonic() - start)
        else:
            t.errors += 1


async def busy_share(engine: str, until: float) -> float:
    samples = []
    async with httpx.AsyncClient(base_url=engine, timeout=5) as http:
        while time.monotonic() < until:
            stats = (await http.get("/sim/stats")).json()
            samples.append(min(SEQS, int(stats["running"])) / SEQS)
            await asyncio.sleep(0.05)
    return statistics.fmean(samples) if samples else 0.0


async def phase(router: str, engine: str, alias: str, tenants: list[Tenant],
                duration_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    now = time.monotonic()
    warm, until = now + 1.0, now + 1.0 + duration_s
    async with httpx.AsyncClient(base_url=router, timeout=60, limits=limits) as http:
        loops = [asyncio.ensure_future(client_loop(http, alias, t, until, warm))
                 for t in tenants for _ in range(t.clients)]
        busy = await busy_share(engine, until)
        await asyncio.gather(*loops)
    out: dict[str, Any] = {"alias": alias, "busy_share": round(busy, 3)}
    for t in tenants:
        lat = sorted(t.latencies)
        out[t.name] = {
            "clients": t.clients, "requests": len(lat), "errors": t.errors,
            "req_s": round(len(lat) / duration_s, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)
            if lat else None,
        }
    return out


async def measure(pool: Pool, keys: dict[str, str], engines: dict[str, str],
                  duration_s: float) -> dict[str, Any]:
    router = pool.urls["router"]

    def tenants(with_a: bool) -> list[Tenant]:
        b = Tenant("B", B_CLIENTS, keys["B"])
        return [Tenant("A", A_CLIENTS, keys["A"]), b] if with_a else [b]

    return {
        "idle": await phase(router, engines["fair"], "fair", tenants(False), duration_s),
        "fair": await phase(router, engines["fair"], "fair", tenants(True), duration_s),
        "fifo": await phase(router, engines["fifo"], "fifo", tenants(True), duration_s),
    }


def report(result: dict[str, Any]) -> str:
    idle = result["idle"]["B"]["p50_ms"]
    lines = ["| phase | B p50 ms | B p99 ms | B p50 / idle | A req/s | B req/s | busy | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("idle", "fair", "fifo"):
        p = result[name]
        b, a = p["B"], p.get("A", {})
        ratio = f"{b['p50_ms'] / idle:.2f}x" if b["p50_ms"] and idle else "-"
        errors = b["errors"] + a.get("errors", 0)
        lines.append(f"| {name} | {b['p50_ms']} | {b['p99_ms']} | {ratio} | "
                     f"{a.get('req_s', '-')} | {b['req_s']} | {p['busy_share']:.0%} | {errors} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.sched_setaffinity(0, {LOAD_CORE})  # the clients stay off the servers' core
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-fairness-"))
    children = Children(run_dir / "logs")
    with interruptible():
        try:
            # Engines on loopback ports: the bench reads their counters over TCP.
            pool = start_pool(children, run_dir, {"ADMIN_TOKEN": ADMIN, "ENGINE_SOCKETS": "tcp"})
            keys, engines = setup(pool)
            result = asyncio.run(measure(pool, keys, engines, args.duration))
        except BaseException:
            print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
            raise
        finally:
            children.stop_all()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    table = report(result)
    print(table)
    if not args.no_docs:
        command = " ".join([".venv/bin/python -m bench.fairness", *sys.argv[1:]])
        docs.replace_block("fairness", f"`{command}`, {args.duration:g} s per phase:\n\n{table}")


if __name__ == "__main__":
    main()
