"""Which process held the CPU, millisecond by millisecond.

    .venv/bin/python -m bench.schedtrace router=PID worker=PID engine=PID
                                          [--seconds 10] [--every-ms 1] [--out FILE]

Samples ``/proc/PID/task/*/schedstat`` of each named process (all its threads): the time its
threads ran and the time they waited runnable for a CPU. Writes one line per sample to
``--out`` (``epoch name:ran_us/waited_us ...``, deltas since the previous sample) and prints,
per process, its share of a CPU, its total wait, and the 50 ms windows in which it ran most
while another waited. Run it on a core the measured processes do not use (``taskset -c 0``
beside ``bench.manystreams``, whose servers are on core 1).

This is how the 1,000-stream stalls of docs/performance.md were found: the engine ran alone
for 60-170 ms (its garbage collector) while the router and the worker had nothing to relay.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

WINDOW_S = 0.05


def _read(pid: int) -> tuple[int, int]:
    """Nanoseconds run and waited by every thread of ``pid`` (0, 0 once it is gone)."""
    ran = waited = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            fields = stat.read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran, waited


def _parse(specs: list[str]) -> dict[str, int]:
    pids: dict[str, int] = {}
    for spec in specs:
        name, sep, pid = spec.partition("=")
        if not sep or not name or not pid.isdigit():
            raise SystemExit(f"expected NAME=PID, not {spec!r}")
        if not Path(f"/proc/{pid}").is_dir():
            raise SystemExit(f"no process {pid} ({name})")
        pids[name] = int(pid)
    return pids


def trace(pids: dict[str, int], seconds: float, every_s: float
          ) -> list[tuple[float, dict[str, tuple[int, int]]]]:
    """(time, {name: (µs ran, µs waited)}) per sample, as deltas."""
    last = {name: _read(pid) for name, pid in pids.items()}
    samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(every_s)
        row: dict[str, tuple[int, int]] = {}
        for name, pid in pids.items():
            ran, waited = _read(pid)
            before = last[name]
            row[name] = ((ran - before[0]) // 1000, (waited - before[1]) // 1000)
            last[name] = (ran, waited)
        samples.append((time.time(), row))
    return samples


def summary(samples: list[tuple[float, dict[str, tuple[int, int]]]]) -> str:
    if not samples:
        return "no samples"
    span_us = max(1.0, (samples[-1][0] - samples[0][0]) * 1e6)
    names = list(samples[0][1])
    lines = [f"{len(samples)} samples over {span_us / 1e6:.1f} s"]
    for name in names:
        ran = sum(row[name][0] for _, row in samples)
        waited = sum(row[name][1] for _, row in samples)
        lines.append(f"  {name}: {ran / span_us:.1%} of a CPU, waited {waited / 1000:,.0f} ms")
    # Windows where one process ran most of the time while the others waited (or idled).
    windows: dict[tuple[int, str], int] = {}
    for t, row in samples:
        key = int(t / WINDOW_S)
        for name, (ran, _) in row.items():
            windows[(key, name)] = windows.get((key, name), 0) + ran
    top = sorted(windows.items(), key=lambda kv: kv[1], reverse=True)[:5]
    lines.append(f"  busiest {WINDOW_S * 1000:.0f} ms windows (start, process, ms ran):")
    for (key, name), ran in top:
        lines.append(f"    {key * WINDOW_S:.2f} {name} {ran / 1000:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.schedtrace",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("pids", nargs="+", metavar="NAME=PID")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--every-ms", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None, help="one line per sample")
    opts = ap.parse_args(argv)
    samples = trace(_parse(opts.pids), opts.seconds, opts.every_ms / 1000)
    if opts.out is not None:
        with opts.out.open("w") as out:
            for t, row in samples:
                cells = " ".join(f"{n}:{r}/{w}" for n, (r, w) in row.items())
                out.write(f"{t:.4f} {cells}\n")
    print(summary(samples), file=sys.stderr)


if __name__ == "__main__":
    main()
