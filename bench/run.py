"""The benchmark suite in one command: data plane, then control-plane scale.

    .venv/bin/python -m bench.run [--quick] [--duration S] [--repeat N] [--json PATH]
                                  [--only data|control] [--no-docs]

Starts everything it needs (redis-server, manager, worker, router, nginx, vllm-router), prints
the tables, writes the JSON file (default bench/results/latest.json) and, unless --quick or
--no-docs, the tables in docs/performance.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import control_plane, dataplane, docs, machine, report
from bench.procset import ROOT, Children, interruptible

DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 s points, one repetition, control plane at 1/10 scale only")
    ap.add_argument("--duration", type=int, default=None, help="seconds per point (5)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per point (3)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--only", choices=("data", "control"), default=None)
    ap.add_argument("--configs", default=",".join(dataplane.CONFIGS),
                    help="comma list of data-plane configurations")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="measure nothing: render the tables (and docs) from a results file")
    return ap.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    return " ".join([".venv/bin/python -m bench.run", *sys.argv[1:]]).strip()


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    opts = dataplane.Options(
        duration_s=args.duration or (2 if args.quick else 5),
        repeat=args.repeat or (1 if args.quick else 3),
        configs=tuple(c for c in args.configs.split(",") if c),
    )
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-bench-"))
    children = Children(run_dir / "logs")
    try:
        result = dataplane.run(children, run_dir, opts)
    except BaseException:
        print(f"logs kept in {run_dir / 'logs'}", file=sys.stderr)
        raise
    finally:
        children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    return result | {"options": {"duration_s": opts.duration_s, "repeat": opts.repeat}}


def data_markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    items = report.goals(s["plain"], s["streams"])
    data["goals"] = items
    return "\n\n".join([
        "Non-streamed requests (wrk, `max_tokens` 8):", report.plain_table(s["plain"]),
        "Streamed requests (64 tokens each):", report.stream_table(s["streams"]),
        f"Goals (streaming: at the issue's reference point, {report.REFERENCE_STREAMS}):",
        report.goals_table(items),
        "The streaming measures at the stress points (no target; see docs/performance.md):",
        report.goals_table(report.stress_measures(s["streams"])),
    ])


def header(info: dict[str, str], cmd: str) -> str:
    return f"Run of {info['date']}: `{cmd}`\n\nMachine: {machine.as_markdown(info)}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine.describe(), "command": command_line(args)}
    with interruptible():
        if args.only in (None, "data"):
            out["data_plane"] = run_data(args)
            _save(args.json, out)  # a later failure must not lose minutes of measurements
        if args.only in (None, "control"):
            out["control_plane"] = control_plane.run(quick=args.quick)
    _save(args.json, out)
    return out


def _strict(value: Any) -> Any:
    """NaN (a percentile of nothing, e.g. no gaps when each stream came in one read) is not
    JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _save(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(out), indent=1, default=str, allow_nan=False))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = json.loads(args.from_json.read_text()) if args.from_json else measure(args)
    info = out["machine"]
    blocks: dict[str, str] = {}
    if "data_plane" in out:
        blocks["data-plane"] = header(info, out["command"]) + "\n\n" + data_markdown(
            out["data_plane"])
    if "control_plane" in out:
        blocks["control-plane"] = header(info, out["command"]) + "\n\n" + control_plane.markdown(
            out["control_plane"])
    for text in blocks.values():
        print("\n" + text + "\n")
    print(f"results: {args.from_json or args.json}")
    if not (args.quick or args.no_docs):
        for name, text in blocks.items():
            docs.replace_block(name, text)
        print(f"updated {docs.DOC}")


if __name__ == "__main__":
    main()
