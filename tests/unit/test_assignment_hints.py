"""Which hints wake a worker's assignment check: its own assignments, any model change, lost
hints; not the pool's other traffic (routes, demand, keys), which at thousands of workers made
every worker read its versions on every hint."""

from __future__ import annotations

from services.worker.assignments import relevant


def test_only_hints_that_may_change_what_runs_here_are_relevant() -> None:
    assert relevant({"kind": "assign", "alias": "a", "worker": "w1"}, "w1")
    assert not relevant({"kind": "assign", "alias": "a", "worker": "w2"}, "w1")
    assert relevant({"kind": "assign", "alias": "a"}, "w1")  # a batch over several workers
    assert relevant({"kind": "model", "alias": "a"}, "w1")
    assert relevant({"kind": "resubscribed"}, "w1")
    for kind in ("route", "demand", "intent", "keys", "worker"):
        assert not relevant({"kind": kind, "alias": "a", "worker": "w1"}, "w1"), kind
    assert not relevant({}, "w1")
