"""One measured point: a load generator run against one configuration, with the CPU time each
server process used meanwhile."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cpu
from bench.procset import LOAD_CORE, PYTHON, Children, pinned, run_to_end
from bench.wrkload import run_wrk

PLAIN_MAX_TOKENS = 8
STREAM_TOKENS = 64


@dataclass(frozen=True)
class Target:
    """A configuration: where requests go and which processes serve them."""

    name: str
    urls: dict[str, str]  # alias -> chat completions URL
    groups: dict[str, list[int]]  # service -> its process groups, for CPU accounting


def body(alias: str, stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"model": alias, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        return out | {"stream": True, "max_tokens": STREAM_TOKENS}
    return out | {"max_tokens": PLAIN_MAX_TOKENS}


def _cpu_per_request(
    groups: dict[str, list[int]], before: dict[str, float], count: int
) -> dict[str, float]:
    """Microseconds of CPU per completed request, per service."""
    used = cpu.delta(before, cpu.snapshot(groups))
    return {name: (s * 1e6 / count if count else 0.0) for name, s in used.items()}


def plain_point(
    children: Children, target: Target, script: Path, connections: int, duration_s: int
) -> dict[str, Any]:
    before = cpu.snapshot(target.groups)
    t0 = time.monotonic()
    result = run_wrk(children, target.urls["sim0"], script, connections, duration_s)
    wall = time.monotonic() - t0
    per_req = _cpu_per_request(target.groups, before, result.requests)
    busy = sum(per_req.values()) * result.requests / 1e6 / wall
    return result.as_dict() | {"cpu_us": per_req, "server_core_busy": busy}


def stream_point(
    children: Children, target: Target, alias: str, body_file: Path, streams: int,
    duration_s: float, out_dir: Path, ramp_s: float = 0.0, warmup_s: float | None = None,
    probes: dict[str, str] | None = None,
) -> dict[str, Any]:
    out = out_dir / "stream-result.json"
    out.unlink(missing_ok=True)
    argv = [PYTHON, "-m", "bench.streamload", "--url", target.urls[alias],
            "--body-file", str(body_file), "--streams", str(streams),
            "--duration", str(duration_s), "--out", str(out), "--ramp", str(ramp_s)]
    if warmup_s is not None:
        argv += ["--warmup", str(warmup_s)]
    for name, url in (probes or {}).items():
        argv += ["--probe", f"{name}={url}"]
    before = cpu.snapshot(target.groups)
    log = run_to_end(children, "streamload", pinned(LOAD_CORE, argv),
                     duration_s + (warmup_s or 0) + 120)
    if not out.exists():
        raise SystemExit(f"stream client wrote no result:\n{log[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["cpu_us"] = _cpu_per_request(target.groups, before, int(result["completed"]))
    return result
