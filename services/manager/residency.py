"""Pure residency decisions: how many replicas a model wants now, and whether its instances
should serve or sleep. Inputs in, a decision out; no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.models import Assignment, ModelSpec

# An instance in these states is doing something: the model is not idle.
_BUSY_STATES = frozenset({"PENDING", "STARTING", "WARMING", "STOPPING"})


@dataclass(frozen=True)
class Usage:
    """What a worker reports of one instance."""

    state: str = ""
    inflight: int = 0
    last_request_at: float = 0.0
    active_at: float = 0.0

    @classmethod
    def from_record(cls, rec: Mapping[str, str]) -> Usage:
        return cls(
            state=rec.get("state", ""),
            inflight=int(rec.get("inflight", "0") or 0),
            last_request_at=float(rec.get("last_request_at", "0") or 0),
            active_at=float(rec.get("active_at", "0") or 0),
        )


@dataclass
class ScaleState:
    """Since when the load has asked for more (or fewer) replicas than there are."""

    above_since: float | None = None
    below_since: float | None = None


def autoscale(
    spec: ModelSpec, current: int, inflight: int, state: ScaleState, now: float,
    out_after_s: float, in_after_s: float,
) -> int:
    """The replica count for a model with ``target_inflight``: one step at a time, after the
    load has stayed past the target for a while (so a burst does not start an engine)."""
    low = max(spec.min_replicas, 1)
    high = spec.max_replicas or spec.replicas
    want = min(high, max(low, math.ceil(inflight / (spec.target_inflight or 1))))
    if current < low:
        return low
    if want > current:
        state.below_since = None
        if state.above_since is None:
            state.above_since = now
        if now - state.above_since >= out_after_s:
            state.above_since = None
            return current + 1
    elif want < current:
        state.above_since = None
        if state.below_since is None:
            state.below_since = now
        if now - state.below_since >= in_after_s:
            state.below_since = None
            return current - 1
    else:
        state.above_since = state.below_since = None
    return min(high, current)


@dataclass
class Decision:
    desired: int
    stop_all: bool = False
    targets: dict[str, str] = field(default_factory=dict)  # worker -> new target
    reason: str = ""


def idle_for(
    assigned: Mapping[str, Assignment], usage: Mapping[str, Usage], now: float
) -> float | None:
    """Seconds since the model last did anything, or None while it is busy."""
    if any(u.inflight > 0 or u.state in _BUSY_STATES for u in usage.values()):
        return None
    if any(w not in usage for w in assigned):
        return None  # assigned but not yet reported: starting
    marks = [a.assigned_at for a in assigned.values()]
    marks += [max(u.last_request_at, u.active_at) for u in usage.values()]
    return now - max(marks) if marks else None


def decide(
    spec: ModelSpec,
    assigned: Mapping[str, Assignment],
    usage: Mapping[str, Usage],
    demand: bool,
    now: float,
) -> Decision:
    """``assigned``: every assignment of the model (worker -> assignment), the scheduler's and
    operators'; ``usage``: the instances workers report; ``demand``: a request is waiting.
    ``desired`` counts the scheduler's own replicas only."""
    if demand:
        wake = {w: "running" for w, a in assigned.items() if a.target != "running"}
        return Decision(desired=spec.replicas, targets=wake, reason="requested" if wake else "")
    own = sum(1 for a in assigned.values() if a.source == "scheduler")
    active = spec.min_replicas > 0 or own > 0
    desired = spec.replicas if active else 0
    idle = idle_for(assigned, usage, now) if assigned else None
    if idle is None:
        return Decision(desired=desired)
    if spec.idle_stop_s is not None and spec.min_replicas == 0 and idle >= spec.idle_stop_s:
        return Decision(desired=0, stop_all=True, reason=f"idle {idle:.1f}s")
    if spec.idle_sleep_s is not None and idle >= spec.idle_sleep_s:
        sleep = {w: "sleeping" for w, a in assigned.items() if a.target != "sleeping"}
        return Decision(desired=desired, targets=sleep, reason=f"idle {idle:.1f}s" if sleep else "")
    return Decision(desired=desired)
