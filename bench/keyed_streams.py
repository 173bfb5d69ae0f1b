"""Streams of an API key that did not ask for ``stream_options.include_usage``: what the
router's usage filter costs them (docs/performance.md, thirteenth session).

``python -m bench.keyed_streams --out R.json`` starts its own pool (redis, manager, worker
with sim engines, router; the servers on one core, the load on the other), creates a key
with a token limit, then runs 64-token chat streams with that key: 16 at once on an engine
that writes at once (sim0), and 64 at once at 5 ms a token (sim5). Prints and writes, per
point, the stream client's figures (bench.streamload) and the router's CPU per stream.
Compare two trees by running it in each, interleaved (base head head base).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import cpu
from bench.pool import register_models, start_pool
from bench.procset import LOAD_CORE, PYTHON, Children, pinned, run_to_end

# bench.streamload with an Authorization header: the key's secret is its first argument.
_KEYED_LOAD = (
    "import sys, bench.streamload as s; o = s.build_request; k = sys.argv.pop(1).encode();"
    "s.build_request = lambda u, b: (lambda h, p, r: (h, p, r.replace(b'Content-Type', "
    "b'Authorization: Bearer ' + k + b'\\r\\nContent-Type', 1)))(*o(u, b)); s.main()")
POINTS = (("sim0", 16, 4.0), ("sim5", 64, 5.0))


def _point(children: Children, url: str, key: str, body: Path, streams: int,
           duration_s: float, router_pid: int, out_dir: Path) -> dict[str, Any]:
    out = out_dir / "streams.json"
    out.unlink(missing_ok=True)
    argv = [PYTHON, "-c", _KEYED_LOAD, key, "--url", url, "--body-file", str(body),
            "--streams", str(streams), "--duration", str(duration_s), "--out", str(out)]
    groups = {"router": [router_pid]}
    before = cpu.snapshot(groups)
    log = run_to_end(children, "streamload", pinned(LOAD_CORE, argv), duration_s + 60)
    if not out.exists():
        raise SystemExit(f"stream client wrote no result:\n{log[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    used = cpu.delta(before, cpu.snapshot(groups))
    result["router_us_per_stream"] = used["router"] * 1e6 / max(1, int(result["completed"]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run = Path(d)
        children = Children(run / "logs")
        try:
            pool = start_pool(children, run)
            register_models(pool)
            router = pool.urls["router"]
            made = httpx.post(f"{router}/admin/keys", timeout=10,
                              json={"name": "bench", "tenant": "bench", "tpm": 10**9})
            made.raise_for_status()
            key = made.json()["key"]
            results = {}
            for alias, streams, duration_s in POINTS:
                body = run / f"{alias}.json"
                body.write_text(json.dumps({
                    "model": alias, "stream": True, "max_tokens": 64,
                    "messages": [{"role": "user", "content": "hi"}]}))
                results[alias] = _point(children, f"{router}/v1/chat/completions", key, body,
                                        streams, duration_s, pool.pids["router"], run)
        finally:
            children.stop_all()
    args.out.write_text(json.dumps(results))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
