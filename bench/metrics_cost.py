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
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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
    args = ap.parse_args()
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
    print(f"\n{table(raw)}\n\n({args.repeat} repetitions of {args.duration} s points, "
          f"{time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
