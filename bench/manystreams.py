"""Many slow streams: TTFT and chunks/s with 300, 1,000 and 3,000 concurrent streams at 10
tokens/s each (64 tokens), through each proxy in front of the same simulated engine.

    .venv/bin/python -m bench.manystreams [--streams 300,1000,3000] [--duration 8] [--repeat 1]
                                         [--configs direct,nginx,vllm-router,worker,router,node]
                                         [--json PATH]

The load shape of a busy pool: many long chats read at reading speed, so most connections sit
in a stream and new requests keep arriving. The clients' first streams are spread over one
stream's length (``--ramp``, 6.4 s), so streams begin and end evenly over time: in the steady
state N streams of 6.4 s mean N / 6.4 new requests per second, each waiting behind the
relaying of N x 10 chunks/s. TTFT (request written -> first event; the simulated engine sends
its role chunk at once) is then what a new request waits for on its way through the proxies.

Configurations (servers pinned to the server core, the stream client to the other, as in
``bench.run``): ``direct`` (client -> engine), ``nginx`` and ``vllm-router`` (one hop of a
C or Rust proxy -> engine; vllm-router only when installed), ``worker`` (the worker's proxy
alone), ``router`` (router -> worker -> engine) and ``node`` (router and worker as one
process, services.node, in a second pool with an engine of its own: router -> engine). nginx
here fronts the engine, not the router: it is the reference for what one proxy hop should cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.frontends import start_nginx, start_vllm_router
from bench.points import Target, body, stream_point
from bench.pool import register_models, start_pool
from bench.procset import ROOT, Children, interruptible

ALIAS = "sim100"
ITL_S = 0.1  # 10 tokens/s
TOKENS = 64
STREAM_S = ITL_S * TOKENS
CONFIGS = ("direct", "nginx", "vllm-router", "worker", "router", "node")
_PATH = "/v1/chat/completions"
DEFAULT_JSON = ROOT / "bench" / "results" / "manystreams.json"


def _progress(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# The processes a configuration's requests pass through that answer a trivial GET: their
# event-loop lag is probed while the streams run (where does a new request wait?).
_PROBED = {"worker": ("worker",), "router": ("router", "worker"), "node": ("node",)}


def build_targets(children: Children, run_dir: Path, configs: tuple[str, ...]
                  ) -> tuple[list[Target], dict[str, str]]:
    pool = start_pool(children, run_dir)
    register_models(pool, aliases={ALIAS: ["--itl", str(ITL_S)]})
    engine = pool.engines[ALIAS]
    urls = {"direct": engine.url, "worker": f"{pool.urls['worker']}/proxy/{ALIAS}",
            "router": pool.urls["router"]}
    groups = {"engine": [engine.pid], "worker": [pool.pids["worker"]],
              "router": [pool.pids["router"]]}
    if "nginx" in configs:
        urls["nginx"], pid = start_nginx(children, run_dir / "nginx", engine.url)
        groups["nginx"] = [pid]
    if "vllm-router" in configs:
        try:
            urls["vllm-router"], pid = start_vllm_router(children, "vllm-router", engine.url)
            groups["vllm-router"] = [pid]
        except SystemExit as e:  # not installed: compare with the others
            _progress(f"vllm-router left out: {e}")
    health = {name: pool.urls[name] + "/health" for name in ("router", "worker")}
    node_groups: dict[str, list[int]] = {}
    if "node" in configs:
        # A second pool whose router and worker are one process (services.node), in front of
        # an engine of its own; that process counts as the router.
        node = start_pool(children, run_dir / "node", node=True)
        register_models(node, aliases={ALIAS: ["--itl", str(ITL_S)]})
        urls["node"] = node.urls["router"]
        health["node"] = node.urls["router"] + "/health"
        node_groups = {"engine": [node.engines[ALIAS].pid], "worker": [],
                       "router": [node.pids["router"]]}
    return [Target(name, {ALIAS: urls[name] + _PATH}, node_groups if name == "node" else groups)
            for name in configs if name in urls], health


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-manystreams-"))
    children = Children(run_dir / "logs")
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        targets, health = build_targets(children, run_dir, tuple(opts.configs.split(",")))
        body_file = run_dir / "stream.json"
        body_file.write_text(json.dumps(body(ALIAS, stream=True) | {"max_tokens": TOKENS}))
        for rep in range(opts.repeat):
            order = targets[rep % len(targets):] + targets[: rep % len(targets)]
            for n in opts.streams:
                for t in order:
                    probes = {p: health[p] for p in _PROBED.get(t.name, ())}
                    r = stream_point(children, t, ALIAS, body_file, n, opts.duration, run_dir,
                                     ramp_s=opts.ramp, warmup_s=opts.ramp + 1, probes=probes)
                    raw.setdefault(str(n), {}).setdefault(t.name, []).append(r)
                    _progress(f"rep {rep + 1} {n} streams {t.name}: "
                              f"{r['chunks_per_s']:,.0f} chunks/s, TTFT p50 "
                              f"{r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} ms, "
                              f"errors {r['errors']}, client busy {r['client_cpu_busy']:.2f}")
    except BaseException:
        print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
        children.stop_all()
        raise
    children.stop_all()
    if opts.keep_logs:  # the router's access log (its own ttft_ms), the worker's warnings
        print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return raw


def _median(samples: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def _probes(samples: list[dict[str, Any]]) -> str:
    out = []
    for name in ("router", "worker", "node"):
        if f"probe_{name}_50_ms" in samples[0]:
            out.append(f"{_median(samples, f'probe_{name}_50_ms'):.1f}/"
                       f"{_median(samples, f'probe_{name}_99_ms'):.1f}")
    return "; ".join(out) or "·"


def table(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    rows = ["| streams | configuration | TTFT p50 ms | TTFT p99 ms | chunks/s | vs direct | "
            "errors | server CPU µs/stream (engine, worker, router, front) | "
            "GET /health p50/p99 ms (router; worker, or node) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n, configs in raw.items():
        direct = _median(configs["direct"], "chunks_per_s") if "direct" in configs else 0
        for name, samples in configs.items():
            cps = _median(samples, "chunks_per_s")
            cpu = samples[-1]["cpu_us"]
            front = cpu.get("nginx", 0) if name == "nginx" else cpu.get("vllm-router", 0)
            rows.append(
                f"| {n} | {name} | {_median(samples, 'ttft_p50_ms'):.1f} | "
                f"{_median(samples, 'ttft_p99_ms'):.1f} | {cps:,.0f} | "
                f"{cps / direct if direct else float('nan'):.3f} | "
                f"{sum(s['errors'] for s in samples)} | "
                f"{cpu.get('engine', 0):,.0f}, {cpu.get('worker', 0):,.0f}, "
                f"{cpu.get('router', 0):,.0f}, {front:,.0f} | {_probes(samples)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.manystreams",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")],
                    default=[300, 1000, 3000])
    ap.add_argument("--duration", type=float, default=8, help="measured seconds per point")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--ramp", type=float, default=STREAM_S,
                    help="spread the clients' first streams over this many seconds (default: "
                         "one stream's length, a steady arrival rate; 0: every client starts "
                         "at once, so the streams come and go in bursts of N)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="measure nothing: print the table of an earlier results file")
    opts = ap.parse_args(argv)
    if opts.from_json:
        raw = json.loads(opts.from_json.read_text())
    else:
        with interruptible():
            raw = measure(opts)
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(raw, indent=1))
        print(f"results: {opts.json}")
    print(table(raw))


if __name__ == "__main__":
    main()
