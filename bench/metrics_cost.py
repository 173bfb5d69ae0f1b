"""What metrics and the access log cost the request path: two routers in front of the same
worker and engines, one with METRICS=true and ACCESS_LOG=on (the defaults), one with
METRICS=false and ACCESS_LOG=off, measured point by point in the same run, interleaved.

Both routers log at INFO, so the access log lines are really written (to their log files).
The goals (docs/observability.md, issue 13): router+worker CPU per request at most +10%, and
the p50 at concurrency 1 at most +0.05 ms. The worker records no metric per request, so its
CPU is the same for both routers by construction: the difference is the router's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.docs import replace_block
from bench.points import Target, body, plain_point, stream_point
from bench.pool import Pool, register_models, service_env, start_pool
from bench.procset import (
    PYTHON,
    SERVER_CORE,
    Children,
    free_port,
    interruptible,
    pinned,
    wait_http,
)
from bench.wrkload import write_script
from services.router.metrics import AccessLog, Recorder, RouterMetrics

VARIANTS = {"metrics-on": {"METRICS": "true", "ACCESS_LOG": "on"},
            "metrics-off": {"METRICS": "false", "ACCESS_LOG": "off"}}
PLAIN = (1, 16)
STREAMS = 64  # of sim5 (5 ms between tokens): per-chunk work shows here
_PATH = "/v1/chat/completions"


def start_router(children: Children, pool: Pool, run_dir: Path, name: str,
                 over: dict[str, str]) -> tuple[str, int]:
    port = free_port()
    env = service_env(pool.redis_url, run_dir / "state") | over | {
        "ROUTER_HOST": "127.0.0.1", "ROUTER_PORT": str(port), "LOG_LEVEL": "INFO"}
    proc = children.start(name, pinned(SERVER_CORE, [PYTHON, "-m", "services.router.main"]),
                          env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, children.log(name), 60)
    return url, proc.pid


def targets(children: Children, pool: Pool, run_dir: Path) -> list[Target]:
    out = []
    for name, over in VARIANTS.items():
        url, pid = start_router(children, pool, run_dir, name, over)
        groups = {"router": [pid], "worker": [pool.pids["worker"]],
                  "engine": [e.pid for e in pool.engines.values()]}
        out.append(Target(name, {a: url + _PATH for a in pool.engines}, groups))
    return out


def measure(children: Children, chosen: list[Target], run_dir: Path, duration_s: int,
            repeat: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    script = write_script(run_dir / "chat.lua", body("sim0", stream=False))
    stream_body = run_dir / "stream.json"
    stream_body.write_text(json.dumps(body("sim5", stream=True)))
    for t in chosen:  # warm both: connection pools, imports, caches
        plain_point(children, t, script, 16, 1)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(repeat):
        order = chosen[rep % 2:] + chosen[: rep % 2]  # no one always goes first
        for c in PLAIN:  # each point on both routers back to back: the same machine noise
            for t in order:
                r = plain_point(children, t, script, c, duration_s)
                raw.setdefault(f"c{c}", {}).setdefault(t.name, []).append(r)
                print(f"  rep {rep + 1} c={c} {t.name}: {r['rps']:,.0f} req/s, p50 "
                      f"{r['p50_ms']:.3f} ms, router+worker {_rw(r):.0f} µs/req", flush=True)
        for t in order:
            s = stream_point(children, t, "sim5", stream_body, STREAMS, duration_s, run_dir)
            raw.setdefault("streams", {}).setdefault(t.name, []).append(s)
            print(f"  rep {rep + 1} {STREAMS} streams {t.name}: router+worker {_rw(s):.0f} "
                  f"µs/stream", flush=True)
    return raw


_ANSWER = (b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],'
           b'"usage":{"prompt_tokens":6,"total_tokens":11,"completion_tokens":5}}')


def record_cost(n: int = 5000, rounds: int = 9) -> dict[str, float]:
    """CPU µs (process time, best of ``rounds``) of one request's record, start to finish,
    in this process: what each setting adds, without the noise of a whole pool."""
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole measure
    variants = {
        "off": Recorder(None, AccessLog(False, 1.0)),
        "metrics": Recorder(RouterMetrics(CollectorRegistry()), AccessLog(False, 1.0)),
        "access log": Recorder(None, AccessLog(True, 1.0, "text", stream=devnull)),
        "metrics + access log": Recorder(RouterMetrics(CollectorRegistry()),
                                         AccessLog(True, 1.0, "text", stream=devnull)),
    }

    async def measure_all() -> dict[str, float]:
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(rounds):
            for name, recorder in variants.items():
                c0 = time.process_time()
                for _ in range(n):
                    r = recorder.start("0123456789abcdef0123456789abcdef")
                    r.alias = "sim0"
                    r.answered("w1", 0.0005)
                    r.body(_ANSWER)
                    r.finish(200)
                recorder.access.flush()
                best[name] = min(best[name], (time.process_time() - c0) / n * 1e6)
        return best

    try:
        return asyncio.run(measure_all())  # the access log batches on a running loop
    finally:
        devnull.close()


def _rw(point: dict[str, Any]) -> float:
    return float(point["cpu_us"]["router"] + point["cpu_us"]["worker"])


def table(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Medians over the repetitions, on vs off, and the goals."""
    lines = ["| point | router+worker CPU µs/req off | on | ratio | p50 ms off | on | "
             "p50 added ms |", "|---|---|---|---|---|---|---|"]
    for point, configs in raw.items():
        off, on = configs["metrics-off"], configs["metrics-on"]
        cpu_off = statistics.median(_rw(p) for p in off)
        cpu_on = statistics.median(_rw(p) for p in on)
        key = "p50_ms" if point != "streams" else "ttft_p50_ms"
        p50_off = statistics.median(p[key] for p in off)
        p50_on = statistics.median(p[key] for p in on)
        name = point if point != "streams" else f"{STREAMS} streams ITL 5 ms (per stream; TTFT)"
        lines.append(f"| {name} | {cpu_off:.1f} | {cpu_on:.1f} | {cpu_on / cpu_off:.3f} | "
                     f"{p50_off:.3f} | {p50_on:.3f} | {p50_on - p50_off:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.metrics_cost",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per point")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (interleaved)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw points here")
    ap.add_argument("--docs", action="store_true",
                    help="put the table in docs/performance.md (block bench:metrics-cost)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="measure nothing: the table from an earlier --json file")
    args = ap.parse_args()
    if args.from_json is not None:
        report(json.loads(args.from_json.read_text()), args, "from " + args.from_json.name)
        return
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-metrics-cost-"))
    children = Children(run_dir)
    t0 = time.monotonic()
    with interruptible():
        try:
            pool = start_pool(children, run_dir)
            register_models(pool)
            raw = measure(children, targets(children, pool, run_dir), run_dir,
                          args.duration, args.repeat)
        finally:
            children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    report(raw, args, f"{time.monotonic() - t0:.0f} s")


def report(raw: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace,
           took: str) -> None:
    reps = len(next(iter(raw.values()))["metrics-on"])
    cost = record_cost()
    rows = "\n".join(f"| {k} | {v:.1f} | {v - cost['off']:+.1f} |" for k, v in cost.items())
    text = (f"{table(raw)}\n\nMedians of {reps} interleaved repetitions "
            f"({time.strftime('%Y-%m-%d')}, {took}): `python -m bench.metrics_cost "
            f"--duration {args.duration} --repeat {args.repeat}`.\n\n"
            "One request's record alone, in process (CPU time, best of 9 rounds of 5,000):\n\n"
            "| router record | CPU µs/request | added |\n|---|---|---|\n" + rows)
    print("\n" + text)
    if args.docs:
        replace_block("metrics-cost", text)


if __name__ == "__main__":
    main()
