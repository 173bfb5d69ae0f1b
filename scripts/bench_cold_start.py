"""Benchmark: what the pool adds to a cold start and to a wake, as seen by a held client.

Starts its own redis-server (on a free port), manager, worker and router (simulated engine),
with their data and logs in a temporary directory removed at the end (`--keep` keeps it), so
a pool running on this machine is neither used nor touched. Then, repeatedly:
- cold: the model is stopped (scale to zero); a request arrives and is held; measured from the
  moment the engine first answered /health to the first response byte at the client;
- wake: the model sleeps; a request wakes it; measured from the moment the engine reported it
  was awake to the first response byte.
Both spans include the warm-up request, the route publication, the router noticing it, and
the forwarding through router and worker proxy. All processes run on this machine, so their
wall clocks agree.

    .venv/bin/python -m scripts.bench_cold_start --rounds 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from scripts.start_all import Stack, start_redis, wait_http

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pool(stack: Stack) -> str:
    run_dir = stack.run
    env = dict(os.environ) | {"LOG_FORMAT": "text", "LOG_LEVEL": "WARNING",
                              "GPU_BACKEND": "none", "WORKER_ENGINES": "sim",
                              "DEFAULT_ENGINE": "sim", "STATE_DIR": str(run_dir / "state")}
    # Its own Redis on a free port (the pool's SVLLM_REDIS_PORT and .run/ are left alone).
    env["REDIS_URL"] = start_redis(stack, free_port())
    ports = {}
    for name in ("manager", "worker", "router"):
        port = str(free_port())
        ports[name] = port
        env |= {f"{name.upper()}_PORT": port, f"{name.upper()}_HOST": "127.0.0.1"}
        if name == "worker":
            env |= {"WORKER_ID": "bench", "WORKER_URL": f"http://127.0.0.1:{port}"}
        proc = stack.start(name, [sys.executable, "-m", f"services.{name}.main"], env)
        wait_http(f"http://127.0.0.1:{port}/health", proc, run_dir / "logs" / f"{name}.log", 60)
    return f"http://127.0.0.1:{ports['router']}"


def instance(router: str, alias: str) -> dict[str, str]:
    for m in httpx.get(f"{router}/admin/models", timeout=10).json()["models"]:
        if m["alias"] == alias:
            return dict(m["instances"][0]) if m["instances"] else {}
    return {}


def wait_for(check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit("benchmark: a state was not reached in time")


def first_byte(router: str, alias: str) -> float:
    """Send one streamed request; the wall-clock time its first data byte arrived
    (keepalive comments sent while it was held do not count)."""
    body = BODY | {"model": alias, "stream": True}
    t = 0.0
    with httpx.stream("POST", f"{router}/v1/chat/completions", json=body, timeout=60) as r:
        for chunk in r.iter_raw():
            if not t and not chunk.startswith(b":"):
                t = time.time()
    if not t:
        raise SystemExit(f"benchmark: empty response ({r.status_code})")
    if r.status_code != 200:
        raise SystemExit(f"benchmark: request failed with {r.status_code}")
    return t


def measure(router: str, alias: str, kind: str, rounds: int) -> list[dict[str, float]]:
    mark = "healthy_at" if kind == "cold" else "awake_at"
    out = []
    for _ in range(rounds):
        if kind == "cold":
            wait_for(lambda: not instance(router, alias))
        else:
            wait_for(lambda: instance(router, alias).get("state") == "SLEEPING")
        t_byte = first_byte(router, alias)
        inst = instance(router, alias)
        t_mark, t_active = float(inst[mark]), float(inst["active_at"])
        out.append({"total_ms": (t_byte - t_mark) * 1000,
                    "to_serving_ms": (t_active - t_mark) * 1000,
                    "serving_to_byte_ms": (t_byte - t_active) * 1000})
    return out


def summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in samples[0]:
        vals = sorted(s[key] for s in samples)
        out[key] = {"p50": statistics.median(vals), "p90": vals[int(0.9 * (len(vals) - 1))],
                    "max": vals[-1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-bench-"))
    stack = Stack(run_dir)
    try:
        router = start_pool(stack)
        specs = [{"alias": "cold", "model_name": "sim/cold", "engine": "sim", "min_replicas": 0,
                  "idle_stop_s": 0.3, "extra_args": ["--startup-delay", "0.3"]},
                 {"alias": "wake", "model_name": "sim/wake", "engine": "sim",
                  "idle_sleep_s": 0.3, "extra_args": ["--wake-delay-l1", "0.1"]}]
        for spec in specs:
            httpx.post(f"{router}/admin/models/register", json=spec, timeout=10).raise_for_status()
        results = {kind: summary(measure(router, kind, kind, args.rounds))
                   for kind in ("cold", "wake")}
    finally:
        stack.stop()
        if args.keep:
            print(f"data and logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\norchestration overhead, {args.rounds} rounds each (ms)")
    print(f"{'span':<34}{'p50':>9}{'p90':>9}{'max':>9}")
    for kind, spans in results.items():
        start = "/health" if kind == "cold" else "awake"
        names = {"total_ms": f"{kind}: engine {start} -> first byte",
                 "to_serving_ms": "  of which: warm-up + RUNNING",
                 "serving_to_byte_ms": "  of which: route -> first byte"}
        for key, st in spans.items():
            print(f"{names[key]:<34}{st['p50']:>9.1f}{st['p90']:>9.1f}{st['max']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
