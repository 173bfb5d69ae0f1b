"""Which HTTP client the proxies should use: CPU per request of httpx, of aiohttp and of the
project's own shared/wire.py (what the hot path uses now), each as a plain client of one sim
engine, at 1, 16 and 64 concurrent.

    .venv/bin/python -m bench.client_cost [--requests 4000]

The engine runs on the server core, the client on the load core, so the client's own CPU
time is what a proxy hop would pay for its upstream side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.procset import (
    BENCH_VENV,
    LOAD_CORE,
    PYTHON,
    SERVER_CORE,
    Children,
    free_port,
    interruptible,
    pinned,
    run_to_end,
    wait_tcp,
)

_INTERPRETER = {"httpx": PYTHON, "aiohttp": str(BENCH_VENV / "python"), "wire": PYTHON}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.client_cost",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-clients-"))
    children = Children(run_dir)
    port = free_port()
    engine = [PYTHON, "-m", "services.sim_engine", "--model", "sim", "--served-model-name",
              "sim0", "--host", "127.0.0.1", "--port", str(port)]
    rows = []
    with interruptible():
        try:
            proc = children.start("engine", pinned(SERVER_CORE, engine))
            wait_tcp(port, proc, children.log("engine"), 30)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for c in (1, 16, 64):
                for lib, python in _INTERPRETER.items():
                    argv = [python, "-m", "bench.clientload", "--lib", lib, "--url", url,
                            "--concurrency", str(c), "--requests", str(args.requests)]
                    out = run_to_end(children, "client", pinned(LOAD_CORE, argv), 300)
                    rows.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    print("| concurrency | client | req/s | client CPU µs/request |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['lib']} | {r['rps']:,.0f} | "
              f"{r['cpu_us_per_request']:,.0f} |")


if __name__ == "__main__":
    main()
