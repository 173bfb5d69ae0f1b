"""Repetitions -> medians and spreads, the goals, and the Markdown tables of the data plane."""

from __future__ import annotations

import math
import statistics
from typing import Any

Samples = list[dict[str, Any]]  # one measured point per repetition
# Services whose CPU is shown; the others (redis, manager) only idle along.
CPU_SERVICES = ("engine", "worker", "router", "nginx", "vllm-router")
# The streaming goals are set at the issue's reference point (its peers' table: 64 streams of
# 64 tokens at 5 ms per token). The other points are stress points: with every server on one
# core and an engine generating without pause, any proxy's CPU shows up as lost chunks/s
# (vllm-router too); they are reported against the same limits, without a target.
REFERENCE_STREAMS = "64 streams, ITL 5 ms"


def _values(samples: Samples, key: str, sub: str | None = None) -> dict[str, float]:
    raw = [s[key][sub] if sub else s[key] for s in samples]
    values = [float(v) for v in raw if v is not None and not math.isnan(float(v))]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(samples: Samples) -> dict[str, Any]:
    """Median and min-max of every numeric metric, CPU per service included."""
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        if isinstance(value, dict):
            out[key] = {k: _values(samples, key, k) for k in value}
        elif value is None or isinstance(value, int | float):
            out[key] = _values(samples, key)
    return out


def med(summary: dict[str, Any], *path: str) -> float:
    node: Any = summary
    for p in path:
        node = node[p]
    return _num(node["median"])


def _num(v: float | None) -> float:
    """Medians of nothing are NaN in memory and null once saved as JSON."""
    return float("nan") if v is None else float(v)


def _fmt(v: float | None, digits: int = 1) -> str:
    v = _num(v)
    return "n/a" if math.isnan(v) else f"{v:,.{digits}f}"


def _range(s: dict[str, float], digits: int = 0) -> str:
    if s["min"] == s["max"]:
        return _fmt(s["median"], digits)
    return f"{_fmt(s['median'], digits)} ({_fmt(s['min'], digits)}–{_fmt(s['max'], digits)})"


def _cpu_cells(summary: dict[str, Any]) -> list[str]:
    cpu = summary["cpu_us"]
    return [_fmt(cpu[n]["median"], 0) if _num(cpu[n]["median"]) >= 5 else "·"
            for n in CPU_SERVICES]


def plain_table(plain: dict[str, dict[str, Any]]) -> str:
    """``plain[point][config]`` -> summary; one row per point and configuration."""
    head = ("| c | configuration | req/s median (min–max) | p50 ms | p99 ms | errors | "
            + " | ".join(f"CPU µs/req {n}" for n in CPU_SERVICES) + " |")
    rows = [head, "|" + "---|" * (6 + len(CPU_SERVICES))]
    for point, configs in plain.items():
        for config, s in configs.items():
            rows.append(
                f"| {point.removeprefix('c')} | {config} | {_range(s['rps'])} | "
                f"{_fmt(med(s, 'p50_ms'), 2)} | {_fmt(med(s, 'p99_ms'), 2)} | "
                f"{_fmt(s['errors']['max'], 0)} | " + " | ".join(_cpu_cells(s)) + " |")
    return "\n".join(rows)


def stream_table(streams: dict[str, dict[str, Any]]) -> str:
    head = ("| point | configuration | chunks/s median (min–max) | TTFT p50 ms | TTFT p99 ms | "
            "gap p99 ms | coalesced | errors | "
            + " | ".join(f"CPU µs/stream {n}" for n in CPU_SERVICES) + " |")
    rows = [head, "|" + "---|" * (8 + len(CPU_SERVICES))]
    for point, configs in streams.items():
        for config, s in configs.items():
            rows.append(
                f"| {point} | {config} | {_range(s['chunks_per_s'])} | "
                f"{_fmt(med(s, 'ttft_p50_ms'), 2)} | {_fmt(med(s, 'ttft_p99_ms'), 2)} | "
                f"{_fmt(med(s, 'gap_p99_ms'), 2)} | {med(s, 'coalesced_share'):.1%} | "
                f"{_fmt(s['errors']['max'], 0)} | " + " | ".join(_cpu_cells(s)) + " |")
    return "\n".join(rows)


def goals(
    plain: dict[str, dict[str, Any]], streams: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it was met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, ok: bool, unit: str) -> None:
        out.append({"goal": name, "value": value, "limit": limit, "met": ok, "unit": unit})

    if "c1" in plain and {"direct", "router"} <= set(plain["c1"]):
        added = med(plain["c1"]["router"], "p50_ms") - med(plain["c1"]["direct"], "p50_ms")
        add("added p50 latency, router+worker vs direct, c=1", added, 1.0, added <= 1.0, "ms")
    for point in ("c16", "c64"):
        configs = plain.get(point, {})
        if {"router", "vllm-router"} <= set(configs):
            ratio = med(configs["router"], "rps") / med(configs["vllm-router"], "rps")
            add(f"req/s router+worker / vllm-router, {point}", ratio, 0.5, ratio >= 0.5, "ratio")
    for point, configs in streams.items():
        if point == REFERENCE_STREAMS:
            out.extend(stream_measures(point, configs))
    if "router" in plain.get("c16", {}):
        s = plain["c16"]["router"]
        total = med(s, "cpu_us", "router") + med(s, "cpu_us", "worker")
        add("CPU per request router + worker, c=16", total, 600.0, total <= 600.0, "µs")
    return out


def stream_measures(point: str, configs: dict[str, Any]) -> list[dict[str, Any]]:
    """The streaming goals' three measures at one point (router+worker against direct)."""
    if not {"router", "direct"} <= set(configs):
        return []
    r, d = configs["router"], configs["direct"]
    ratio = med(r, "chunks_per_s") / med(d, "chunks_per_s")
    co_r, co_d = med(r, "coalesced_share"), med(d, "coalesced_share")
    ttft = med(r, "ttft_p50_ms") - med(d, "ttft_p50_ms")
    return [
        {"goal": f"chunks/s router / direct, {point}", "value": ratio, "limit": 0.97,
         "met": ratio >= 0.97, "unit": "ratio"},
        {"goal": f"coalesced share router vs direct ({co_d:.1%}), {point}", "value": co_r,
         "limit": co_d, "met": co_r <= co_d, "unit": "share"},
        {"goal": f"added TTFT p50, {point}", "value": ttft, "limit": 2.0, "met": ttft <= 2.0,
         "unit": "ms"},
    ]


def stress_measures(streams: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The same measures at the other stream points, which carry no target."""
    return [m for point, configs in streams.items() if point != REFERENCE_STREAMS
            for m in stream_measures(point, configs)]


def goals_table(items: list[dict[str, Any]]) -> str:
    rows = ["| goal | measured | limit | met |", "|---|---|---|---|"]
    for g in items:
        fmt = "{:.1%}" if g["unit"] == "share" else "{:.2f}"
        value, limit = fmt.format(g["value"]), fmt.format(g["limit"])
        unit = "" if g["unit"] in ("ratio", "share") else f" {g['unit']}"
        rows.append(f"| {g['goal']} | {value}{unit} | {limit}{unit} | "
                    f"{'yes' if g['met'] else '**no**'} |")
    return "\n".join(rows)
