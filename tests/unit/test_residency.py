from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.manager.residency import ScaleState, Usage, autoscale, decide, idle_for
from shared.models import Assignment, ModelSpec

NOW = 1000.0


def spec(**kw) -> ModelSpec:
    return ModelSpec.model_validate({"alias": "m", "model_name": "o/m", "engine": "sim"} | kw)


def assigned(target: str = "running", at: float = 0.0, source: str = "scheduler") -> Assignment:
    return Assignment.model_validate({"alias": "m", "worker_id": "w1", "target": target,
                                      "assigned_at": at, "source": source})


def used(state: str = "RUNNING", inflight: int = 0, last: float = 0.0, active: float = 0.0):
    return Usage(state=state, inflight=inflight, last_request_at=last, active_at=active)


def test_cold_model_without_demand_stays_at_zero() -> None:
    d = decide(spec(min_replicas=0), {}, {}, demand=False, now=NOW)
    assert d.desired == 0 and not d.stop_all and not d.targets


def test_demand_places_and_wakes() -> None:
    d = decide(spec(min_replicas=0, replicas=2), {}, {}, demand=True, now=NOW)
    assert d.desired == 2
    a = {"w1": assigned("sleeping")}
    d = decide(spec(idle_sleep_s=5), a, {"w1": used("SLEEPING")}, demand=True, now=NOW)
    assert d.targets == {"w1": "running"}


def test_resident_model_keeps_its_replicas() -> None:
    assert decide(spec(min_replicas=1), {}, {}, demand=False, now=NOW).desired == 1


def test_idle_sleep_then_stop() -> None:
    s = spec(min_replicas=0, idle_sleep_s=10, idle_stop_s=60)
    a = {"w1": assigned()}
    fresh = decide(s, a, {"w1": used(last=NOW - 5)}, demand=False, now=NOW)
    assert fresh.desired == 1 and not fresh.targets and not fresh.stop_all
    sleepy = decide(s, a, {"w1": used(last=NOW - 11)}, demand=False, now=NOW)
    assert sleepy.targets == {"w1": "sleeping"}
    gone = decide(s, {"w1": assigned("sleeping")}, {"w1": used("SLEEPING", last=NOW - 61)},
                  demand=False, now=NOW)
    assert gone.stop_all and gone.desired == 0


def test_busy_model_is_never_idle() -> None:
    a = {"w1": assigned()}
    assert idle_for(a, {"w1": used(inflight=1, last=0)}, NOW) is None
    assert idle_for(a, {"w1": used("STARTING")}, NOW) is None
    assert idle_for(a, {}, NOW) is None  # assigned, not yet reported
    # The idle clock restarts when an instance becomes active (after a wake).
    assert idle_for(a, {"w1": used(last=NOW - 100, active=NOW - 3)}, NOW) == pytest.approx(3)


def test_min_replicas_keeps_model_from_stopping() -> None:
    s = spec(min_replicas=1, idle_sleep_s=10)
    d = decide(s, {"w1": assigned()}, {"w1": used(last=NOW - 500)}, demand=False, now=NOW)
    assert not d.stop_all and d.desired == 1 and d.targets == {"w1": "sleeping"}


def test_manual_replica_alone_does_not_activate_model() -> None:
    d = decide(spec(min_replicas=0), {"w1": assigned(source="manual")},
               {"w1": used(last=NOW)}, demand=False, now=NOW)
    assert d.desired == 0


@pytest.mark.parametrize("bad", [
    {"min_replicas": 2, "replicas": 1},
    {"idle_stop_s": 10},  # needs min_replicas 0
    {"min_replicas": 0, "idle_sleep_s": 10, "idle_stop_s": 5},
    {"sleep_level": 3},
    {"cold_start_timeout_s": 0},
    {"idle_sleep_s": -1},
])
def test_residency_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**bad)


def test_autoscale_steps_with_hysteresis() -> None:
    s = spec(replicas=1, max_replicas=3, target_inflight=2)
    st = ScaleState()
    # Load for 3 replicas, but only after it has lasted out_after_s, and one step at a time.
    assert autoscale(s, 1, 6, st, now=0, out_after_s=5, in_after_s=30) == 1
    assert autoscale(s, 1, 6, st, now=4, out_after_s=5, in_after_s=30) == 1
    assert autoscale(s, 1, 6, st, now=5, out_after_s=5, in_after_s=30) == 2
    assert autoscale(s, 2, 6, st, now=6, out_after_s=5, in_after_s=30) == 2
    assert autoscale(s, 2, 6, st, now=11, out_after_s=5, in_after_s=30) == 3
    assert autoscale(s, 3, 60, st, now=20, out_after_s=0, in_after_s=30) == 3  # max
    # A burst that ends resets the clock.
    st = ScaleState()
    assert autoscale(s, 1, 6, st, now=0, out_after_s=5, in_after_s=30) == 1
    assert autoscale(s, 1, 1, st, now=3, out_after_s=5, in_after_s=30) == 1
    assert autoscale(s, 1, 6, st, now=6, out_after_s=5, in_after_s=30) == 1
    # Scale in slowly, never below max(min_replicas, 1).
    st = ScaleState()
    assert autoscale(s, 3, 0, st, now=0, out_after_s=5, in_after_s=30) == 3
    assert autoscale(s, 3, 0, st, now=30, out_after_s=5, in_after_s=30) == 2
    assert autoscale(s, 1, 0, ScaleState(), now=99, out_after_s=5, in_after_s=0) == 1
