"""CPU time and memory of processes, read from /proc.

A service is counted as its whole process group (every child the benchmark starts leads its
own group): nginx's master and worker, vllm-router's threads. Engines lead their own groups
too, so the worker's figure never includes its engines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its closing one.
    return raw[raw.rindex(")") + 2:].split()


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                out.append(int(entry.name))
    return out


def group_rss_mb(pgid: int) -> float:
    total = 0
    for pid in _group_members(pgid):
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += pages
    return total * _PAGE / 2**20


def snapshot(groups: Mapping[str, list[int]]) -> dict[str, float]:
    """name -> CPU seconds so far of its process groups (one scan of /proc for all)."""
    ticks = _ticks_by_group()
    return {name: sum(ticks.get(g, 0) for g in pgids) * _TICK_S
            for name, pgids in groups.items()}


def _ticks_by_group() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                pgid = int(fields[2])
                # fields[11], fields[12]: utime, stime (stat fields 14 and 15)
                out[pgid] = out.get(pgid, 0) + int(fields[11]) + int(fields[12])
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}
