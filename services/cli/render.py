"""Rich renderings of the admin API's answers (pure: data in, renderables out)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATE_STYLES = {"RUNNING": "green", "WARMING": "yellow", "STARTING": "yellow",
                "SLEEPING": "blue", "FAILED": "red", "STOPPED": "magenta", "COLD": "dim"}
BAR_WIDTH = 20


def bar(used: float, total: float, width: int = BAR_WIDTH, reserved: float = 0.0) -> Text:
    """``[████▒▒░░░░]`` used (█) and reserved beyond it (▒) of total, coloured by how full
    it is."""
    frac = min(1.0, used / total) if total > 0 else 0.0
    held = min(1.0, max(used, reserved) / total) if total > 0 else 0.0
    filled = round(frac * width)
    booked = max(0, round(held * width) - filled)
    style = "red" if held > 0.9 else "yellow" if held > 0.7 else "green"
    return Text.assemble("[", ("█" * filled, style), ("▒" * booked, style),
                         ("░" * (width - filled - booked), "dim"), "]")


def state(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def gpus(worker: dict[str, Any]) -> RenderableType:
    if not worker.get("gpus"):
        return Text(worker.get("gpu_message") or "no GPU", style="dim")
    lines = []
    reserved_of = worker.get("gpu_reserved_mb") or {}
    for g in worker["gpus"]:
        used, total = g.get("memory_used_mb", 0), g.get("memory_total_mb", 0)
        reserved = int(reserved_of.get(str(g["index"]), 0))
        lines.append(Text.assemble(
            f"{g['index']} ", bar(used, total, reserved=reserved),
            f" {used}/{total} MB used, {reserved} reserved, {g.get('memory_free_mb', 0)} free"))
    return Group(*lines)


def workers_table(workers: list[dict[str, Any]]) -> Table:
    t = Table(title="Workers", expand=True)
    for col in ("worker", "alive", "url", "engines", "GPUs (memory)", "last seen"):
        t.add_column(col)
    now = time.time()
    for w in workers:
        alive = Text("yes", "green") if w.get("alive") else Text("no", "red")
        seen = f"{now - w['last_seen']:.0f}s ago" if w.get("last_seen") else "-"
        t.add_row(w["worker_id"], alive, w.get("url", ""), ",".join(w.get("engines", [])),
                  gpus(w), seen)
    return t


def serving(model: dict[str, Any]) -> str:
    running = sum(1 for i in model.get("instances", []) if i.get("state") == "RUNNING")
    return f"{running}/{model['spec'].get('replicas', 1)}"


def models_table(models: list[dict[str, Any]]) -> Table:
    t = Table(title="Models", expand=True)
    for col in ("alias", "engine", "state", "serving/wanted", "queue", "last cold start",
                "last wake", "model"):
        t.add_column(col)
    for m in models:
        stats = m.get("stats", {})
        t.add_row(m["alias"], m["engine"], state(m["state"]), serving(m),
                  str(m.get("waiting_requests", 0)), seconds(stats.get("last_cold_start_s")),
                  seconds(stats.get("last_wake_s")), m["model_name"])
    return t


def instances_table(models: list[dict[str, Any]]) -> Table:
    t = Table(title="Instances", expand=True)
    for col in ("alias", "worker", "state", "engine on", "pid", "gpus", "in flight",
                "note / error"):
        t.add_column(col)
    for m in models:
        for i in m.get("instances", []):
            # An engine on a Unix socket (the worker's default) has port 0.
            where = "unix socket" if i.get("socket") else f"port {i.get('port', '')}"
            t.add_row(m["alias"], i["worker_id"], state(i.get("state", "")), where,
                      i.get("pid", ""), i.get("gpus", ""), i.get("inflight", ""),
                      Text(i.get("error") or i.get("note") or "", style="red"))
    return t


def problems(status: dict[str, Any]) -> list[str]:
    """What an operator should look at: dead workers, failed instances, unplaceable models."""
    out = [f"worker {w['worker_id']} is not alive" for w in status["workers"]
           if not w.get("alive")]
    for m in status["models"]:
        if m.get("placement"):
            out.append(f"{m['alias']}: {m['placement']}")
        out.extend(f"{m['alias']} on {i['worker_id']}: {i.get('error') or 'FAILED'}"
                   for i in m.get("instances", []) if i.get("state") == "FAILED")
    out.extend(f"router ejected {r['model']} on {r['worker']} ({r['seconds_left']:.0f} s left)"
               for r in status.get("router", {}).get("ejected") or [])
    out.extend(f"bad Redis record {p['key']}" + (f" [{p['field']}]" if p.get("field") else "")
               + f": {p['reason']}" for p in status.get("problems") or [])
    return out


def status_view(status: dict[str, Any]) -> Group:
    lease = status.get("scheduler", {}).get("lease") or "none (no manager holds the lease)"
    parts: list[RenderableType] = [Text(f"scheduler lease: {lease}"),
                                   workers_table(status["workers"]),
                                   models_table(status["models"]),
                                   instances_table(status["models"])]
    found = problems(status)
    parts.append(Text("Problems", style="bold"))
    parts.extend(Text(f"  - {p}", style="red") for p in found)
    if not found:
        parts.append(Text("  none", style="green"))
    return Group(*parts)


def model_view(m: dict[str, Any]) -> Group:
    t = Table(title=f"Model {m['alias']}", show_header=False)
    t.add_column("field")
    t.add_column("value")
    t.add_row("state", state(m["state"]))
    t.add_row("serving/wanted", serving(m))
    t.add_row("waiting requests", str(m.get("waiting_requests", 0)))
    t.add_row("placement", m.get("placement") or "-")
    for k, v in m["spec"].items():
        t.add_row(k, str(v))
    for k, v in (m.get("stats") or {}).items():
        t.add_row(f"stats.{k}", "-" if v is None else str(v))
    return Group(t, instances_table([m]))


def diff_lines(diff: dict[str, Any], prune: bool, kind: str = "") -> list[Text]:
    """The diff an apply shows: + added, ~ changed field: old -> new, - removed; then the
    file's LoRA adapters, if it has any, as ``+ adapter NAME`` and so on."""
    out = [Text(f"+ {kind}{a}", style="green") for a in diff["added"]]
    for alias, fields in diff["changed"].items():
        out.append(Text(f"~ {kind}{alias}", style="yellow"))
        out.extend(Text(f"    {k}: {old!r} -> {new!r}") for k, (old, new) in fields.items())
    for a in diff["removed"]:
        out.append(Text(f"- {kind}{a}", style="red") if prune else
                   Text(f"  {kind}{a} (not in the file; kept, --prune removes it)",
                        style="dim"))
    if diff.get("adapters") is not None:
        out.extend(diff_lines(diff["adapters"], prune, "adapter "))
    return out


def changes(diff: dict[str, Any], prune: bool) -> int:
    """How many entries an apply changes (removals only with prune)."""
    return len(diff["added"]) + len(diff["changed"]) + (len(diff["removed"]) if prune else 0)
