"""Tables of the control-plane benchmark: each measure at 1/10 and full scale, and its growth.

Both the workers and the aliases grow x10 between the scales, so growth near x10 is linear;
well above it (x100 for a cost in workers x aliases) is flagged.
"""

from __future__ import annotations

from typing import Any

_SUPERLINEAR = 15.0  # growth above this, for a x10 scale-up, is worse than linear

_TIMINGS = {
    "populate_s": "populate (register workers and models)",
    "placement_pass_s": "first reconcile pass (places every alias)",
    "reconcile_pass_s": "reconcile pass, steady (median)",
    "reconcile_pass_max_s": "reconcile pass, steady (max)",
    "route_refresh_first_s": "router route refresh, first (loads all)",
    "route_refresh_steady_s": "router route refresh, nothing changed",
    "route_refresh_routes_changed_s": "router route refresh, a route changed",
}


def _growth(small: float, big: float) -> tuple[str, bool]:
    if small <= 0:
        return "n/a", False
    g = big / small
    return f"x{g:.1f}", g > _SUPERLINEAR


def _row(name: str, small: float, big: float, unit: str, fmt: str) -> str:
    growth, bad = _growth(small, big)
    flag = " **worse than linear**" if bad else ""
    return f"| {name} | {fmt.format(small)} {unit} | {fmt.format(big)} {unit} | {growth}{flag} |"


def _stage_rows(small: dict[str, Any], big: dict[str, Any]) -> list[str]:
    rows = []
    for stage, s in big["stages"].items():
        rows.append(_row(f"Redis commands/s with {stage}", small["stages"][stage]["commands_per_s"],
                         s["commands_per_s"], "", "{:,.0f}"))
    last = list(big["stages"])[-1]
    for proc, busy in big["stages"][last]["cpu_busy"].items():
        rows.append(_row(f"CPU busy: {proc}", small["stages"][last]["cpu_busy"][proc] * 100,
                         busy * 100, "%", "{:.1f}"))
    return rows


def markdown(results: dict[str, Any]) -> str:
    small, big = results["1/10"], results["full"]
    head = (f"| measure | 1/10 scale ({small['workers']} workers, {small['aliases']} aliases) | "
            f"full ({big['workers']} workers, {big['aliases']} aliases) | growth |")
    rows = [head, "|---|---|---|---|"]
    rows += [_row(label, small[k] * 1000, big[k] * 1000, "ms", "{:,.1f}")
             for k, label in _TIMINGS.items()]
    rows += _stage_rows(small, big)
    rows += [_row(f"memory (RSS): {n}", small["rss_mb"][n], v, "MB", "{:,.1f}")
             for n, v in big["rss_mb"].items()]
    last = list(big["stages"])[-1]
    top = ", ".join(f"{c} {v:,.0f}/s" for c, v in big["stages"][last]["top_commands_per_s"].items())
    kept = ", ".join(f"{st}: {s['simulator_kept_up']:.0%}" for st, s in big["stages"].items())
    return "\n".join(rows) + (
        f"\n\nBusiest Redis commands at full scale: {top}.\n\n"
        f"Share of the simulated workers' due ticks done at full scale, per stage: {kept} "
        "(below 100%: the simulator fell behind, so Redis saw fewer worker commands than 500 "
        "real workers would send).\n\n" + goal(big) + "\n\n"
        "The same timings with workers and aliases varied one at a time (in process):\n\n"
        + cross_table(results))


def cross_table(results: dict[str, Any]) -> str:
    """Each timing with one dimension at a time at 1/10: which one drives it."""
    names = ("1/10", "workers/10", "aliases/10", "full")
    if not all(n in results for n in names):
        return ""
    cols = [f"{results[n]['workers']} w × {results[n]['aliases']:,} a" for n in names]
    rows = ["| measure (ms) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(names)]
    for key, label in _TIMINGS.items():
        if key == "populate_s":
            continue
        cells = " | ".join(f"{results[n][key] * 1000:,.1f}" for n in names)
        rows.append(f"| {label} | {cells} |")
    return "\n".join(rows)


def goal(big: dict[str, Any]) -> str:
    t = big["reconcile_pass_s"]
    verdict = "met" if t < 1.0 else "**missed**"
    text = (f"Goal: a reconcile pass over {big['aliases']:,} aliases and {big['workers']} "
            f"workers under 1 s: {t * 1000:,.0f} ms (steady), {verdict}; the first pass, which "
            f"places every alias, took {big['placement_pass_s']:,.1f} s.")
    if "default_lease_lost" in big:
        ttl, placed = big["default_lease_ttl_s"], int(big["default_lease_placed"])
        text += (f" With the default LEASE_TTL_S ({ttl:g} s) the same first pass "
                 + (f"**lost the lease** (NotLeader) after {big['default_lease_pass_s']:.1f} s, "
                    f"having placed {placed:,} of {big['aliases']:,} aliases."
                    if big["default_lease_lost"] else
                    f"kept the lease ({big['default_lease_pass_s']:.1f} s)."))
    return text
