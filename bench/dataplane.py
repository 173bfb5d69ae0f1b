"""The data-plane benchmark: five configurations in front of the same sim engines, measured
point by point with the configurations interleaved inside every repetition."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.frontends import start_nginx, start_vllm_router
from bench.points import Target, body, plain_point, stream_point
from bench.pool import Pool, register_models, start_pool
from bench.procset import Children
from bench.report import summarize
from bench.wrkload import write_script

CONFIGS = ("direct", "worker", "router", "node", "nginx", "vllm-router")
PLAIN_CONCURRENCY = (1, 16, 64)
# (alias, concurrent streams); sim0 generates at once, sim5 waits 5 ms between tokens.
STREAM_POINTS = (("sim0", 64), ("sim0", 256), ("sim5", 64), ("sim5", 256))
_ITL_MS = {"sim0": 0, "sim5": 5}
_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Options:
    duration_s: int
    repeat: int
    configs: tuple[str, ...] = CONFIGS


def stream_point_name(alias: str, streams: int) -> str:
    return f"{streams} streams, ITL {_ITL_MS[alias]} ms"


def build_targets(children: Children, pool: Pool, run_dir: Path, node: Pool | None = None
                  ) -> list[Target]:
    """Every configuration's target; "node" only with ``node``, a second pool whose router
    and worker are one process (services.node), in front of engines of its own."""
    nginx_url, nginx_pid = start_nginx(children, run_dir / "nginx", pool.urls["router"])
    vllm = {a: start_vllm_router(children, f"vllm-router-{a}", e.url)
            for a, e in pool.engines.items()}
    # Every target accounts for every server process: the ones a configuration does not use
    # only show their idle background cost (timers, heartbeats).
    groups = {
        "engine": [e.pid for e in pool.engines.values()],
        "worker": [pool.pids["worker"]],
        "router": [pool.pids["router"]],
        "nginx": [nginx_pid],
        "vllm-router": [pid for _, pid in vllm.values()],
        "redis": [pool.pids["redis"]],
        "manager": [pool.pids["manager"]],
    }
    worker, router = pool.urls["worker"], pool.urls["router"]
    aliases = list(pool.engines)
    urls = {
        "direct": {a: pool.engines[a].url + _PATH for a in aliases},
        "worker": {a: f"{worker}/proxy/{a}{_PATH}" for a in aliases},
        "router": {a: router + _PATH for a in aliases},
        "nginx": {a: nginx_url + _PATH for a in aliases},
        "vllm-router": {a: vllm[a][0] + _PATH for a in aliases},
    }
    targets = {name: Target(name, urls[name], groups) for name in urls}
    if node is not None:
        # Its one process counts as the router; its pool's redis and manager idle along.
        targets["node"] = Target("node", {a: node.urls["router"] + _PATH for a in node.engines},
                                 groups | {"router": [node.pids["router"]], "worker": [],
                                           "engine": [e.pid for e in node.engines.values()],
                                           "redis": [node.pids["redis"]],
                                           "manager": [node.pids["manager"]]})
    return [targets[name] for name in CONFIGS if name in targets]


def _progress(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def measure(
    children: Children, targets: list[Target], opts: Options, run_dir: Path
) -> dict[str, Any]:
    """Raw samples: ``{"plain": {point: {config: [...]}}, "streams": {...}}``."""
    script = write_script(run_dir / "chat.lua", body("sim0", stream=False))
    stream_bodies = {}
    for alias in _ITL_MS:
        path = run_dir / f"stream-{alias}.json"
        path.write_text(json.dumps(body(alias, stream=True)))
        stream_bodies[alias] = path
    chosen = [t for t in targets if t.name in opts.configs]
    for t in chosen:  # warm every path: connection pools, imports, caches
        plain_point(children, t, script, 16, 1)
    plain: dict[str, dict[str, list[dict[str, Any]]]] = {}
    streams: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(opts.repeat):
        # A different first configuration each repetition: no one always goes first.
        order = chosen[rep % len(chosen):] + chosen[: rep % len(chosen)]
        for c in PLAIN_CONCURRENCY:
            for t in order:
                r = plain_point(children, t, script, c, opts.duration_s)
                plain.setdefault(f"c{c}", {}).setdefault(t.name, []).append(r)
                _progress(f"rep {rep + 1} c={c} {t.name}: {r['rps']:,.0f} req/s, "
                          f"p50 {r['p50_ms']:.2f} ms, errors {r['errors']}")
        for alias, n in STREAM_POINTS:
            for t in order:
                r = stream_point(children, t, alias, stream_bodies[alias], n,
                                 opts.duration_s, run_dir)
                name = stream_point_name(alias, n)
                streams.setdefault(name, {}).setdefault(t.name, []).append(r)
                _progress(f"rep {rep + 1} {name} {t.name}: {r['chunks_per_s']:,.0f} chunks/s, "
                          f"TTFT p50 {r['ttft_p50_ms']:.2f} ms, errors {r['errors']}")
    return {"plain": plain, "streams": streams}


def summarize_all(raw: dict[str, Any]) -> dict[str, Any]:
    return {kind: {point: {config: summarize(samples) for config, samples in configs.items()}
                   for point, configs in points.items()}
            for kind, points in raw.items()}


def run(children: Children, run_dir: Path, opts: Options) -> dict[str, Any]:
    _progress("starting redis, manager, worker, router")
    pool = start_pool(children, run_dir)
    register_models(pool)
    node = None
    if "node" in opts.configs:
        _progress("starting a pool whose router and worker are one process (services.node)")
        node = start_pool(children, run_dir / "node", node=True)
        register_models(node)
    _progress("starting nginx and vllm-router")
    targets = build_targets(children, pool, run_dir, node)
    raw = measure(children, targets, opts, run_dir)
    return {"raw": raw, "summary": summarize_all(raw)}
