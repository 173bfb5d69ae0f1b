"""Where the router and the worker spend their CPU under load: py-spy on both while wrk sends
non-streamed requests through router + worker (or, with ``--streams N``, while the stream
client keeps N streams of ``--alias`` open).

    .venv/bin/python -m bench.profile [--connections 16] [--duration 10] [--top 15]
    .venv/bin/python -m bench.profile --streams 64 --alias sim5

Writes py-spy's collapsed stacks and flame graphs to bench/results/profile-*.{txt,svg} and
prints each service's top functions by own time ("self") and by time below them ("total").

py-spy samples wall-clock time: a process that shares its core is often caught preempted
inside a syscall (a socket write that woke the next process up), which shows up as false
"self" time there. So each service is profiled in turn *alone* on the server core, with every
other process (engine, the other service, redis, manager, wrk, py-spy) moved to the other one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.points import Target, body, stream_point
from bench.pool import ALIASES, register_models, start_pool
from bench.procset import LOAD_CORE, ROOT, SERVER_CORE, Children, interruptible, need, pinned
from bench.wrkload import run_wrk, write_script

RESULTS = ROOT / "bench" / "results"
_PROFILED = ("router", "worker")


def _short(frame: str) -> str:
    """'handle (services/router/openai_api.py:22)' -> 'handle (router/openai_api.py:22)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    parts = path.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


def package(frame: str) -> str:
    """The library a frame belongs to: 'httpcore', 'starlette', 'services.router', ...

    py-spy names files relative to their sys.path entry, so the first segment is the package.
    Time in uvloop's C code (the event loop, socket syscalls) shows as asyncio's Runner.run.
    """
    path = frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    if parts[0] in ("services", "shared") and len(parts) > 2:
        return f"{parts[0]}.{parts[1]}"
    name = parts[0].removesuffix(".py")
    if name in sys.stdlib_module_names or name.startswith("_"):
        return f"stdlib ({name})" if name != "asyncio" else "asyncio + uvloop (event loop)"
    return name or "?"


def by_package(collapsed: Path) -> list[tuple[str, float]]:
    """Share of samples by the library of the innermost (running) frame."""
    own: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            own[package(stack.split(";")[-1])] += int(count)
    samples = sum(own.values()) or 1
    return [(p, c / samples) for p, c in own.most_common()]


def top_frames(collapsed: Path, n: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self, total): the ``n`` functions with the largest share of samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        k = int(count)
        samples += k
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    if not samples:
        return [], []
    share = [(f, c / samples) for f, c in own.most_common(n)]
    return share, [(f, c / samples) for f, c in total.most_common(n)]


def record(children: Children, name: str, pid: int, duration_s: int, out: Path) -> None:
    py_spy = need("py-spy", ".venv-bench/bin/pip install -r bench/requirements.txt")
    fmt = "flamegraph" if out.suffix == ".svg" else "raw"
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "200",
            "--nonblocking", "--format", fmt, "--output", str(out)]
    children.start(f"py-spy-{name}-{out.suffix[1:]}", pinned(LOAD_CORE, argv))


def pin_group(pgid: int, core: int) -> None:
    """Move every thread of every process of the group to ``core``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            for task in os.scandir(f"/proc/{entry.name}/task"):
                os.sched_setaffinity(int(task.name), {core})
        except (OSError, ValueError):
            continue  # gone meanwhile


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--streams", type=int, default=0,
                    help="profile N concurrent streams instead of wrk's plain requests")
    ap.add_argument("--alias", default="sim5", choices=("sim0", "sim5", "sim100"),
                    help="with --streams: the engine (sim5: 5 ms between tokens; sim100: "
                         "100 ms, bench.manystreams' load, the clients' starts spread over "
                         "one stream)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-profile-"))
    children = Children(run_dir / "logs")
    with interruptible():
        try:
            pool = start_pool(children, run_dir)
            register_models(pool, aliases=ALIASES | {"sim100": ["--itl", "0.1"]})
            script = write_script(run_dir / "chat.lua", body("sim0", stream=False))
            stream_body = run_dir / "stream.json"
            stream_body.write_text(json.dumps(body(args.alias, stream=True)))
            url = pool.urls["router"] + "/v1/chat/completions"
            groups = [*pool.pids.values(), *(e.pid for e in pool.engines.values())]
            # Slow streams: the clients' starts spread over one stream, then the measured
            # window (the profile covers its end: py-spy starts with the client).
            ramp, warmup = (6.4, 7.4) if args.alias == "sim100" else (0.0, None)
            run_wrk(children, url, script, args.connections, 2)  # warm up
            for name in _PROFILED:
                for pgid in groups:
                    pin_group(pgid, SERVER_CORE if pgid == pool.pids[name] else LOAD_CORE)
                for ext in ("txt", "svg"):
                    record(children, name, pool.pids[name], args.duration,
                           RESULTS / f"profile-{name}.{ext}")
                if args.streams:
                    r = stream_point(children, Target("router", {args.alias: url}, {}),
                                     args.alias, stream_body, args.streams,
                                     args.duration + 1, run_dir, ramp_s=ramp,
                                     warmup_s=warmup)
                    print(f"{name} alone on core {SERVER_CORE}: {args.streams} streams of "
                          f"{args.alias} through router + worker: {r['chunks_per_s']:,.0f} "
                          f"chunks/s, TTFT p50 {r['ttft_p50_ms']:.2f} ms")
                else:
                    result = run_wrk(children, url, script, args.connections, args.duration + 1)
                    print(f"{name} alone on core {SERVER_CORE}: c={args.connections} through "
                          f"router + worker: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms")
                for pname, proc in list(children.procs):
                    if pname.startswith("py-spy-"):
                        proc.wait(timeout=30)  # py-spy writes its file when it ends
                        children.stop(proc)
        finally:
            children.stop_all()
    shutil.rmtree(run_dir, ignore_errors=True)
    for name in _PROFILED:
        collapsed = RESULTS / f"profile-{name}.txt"
        print(f"\n{name}: own time by library")
        for lib, share in by_package(collapsed):
            print(f"  {share:6.1%}  {lib}")
        own, total = top_frames(collapsed, args.top)
        print(f"\n{name}: top by own time (self) — flame graph bench/results/profile-{name}.svg")
        for frame, share in own:
            print(f"  {share:6.1%}  {frame}")
        print(f"{name}: top by time below (total)")
        for frame, share in total:
            print(f"  {share:6.1%}  {frame}")


if __name__ == "__main__":
    main()
