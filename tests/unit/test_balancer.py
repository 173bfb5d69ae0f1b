from __future__ import annotations

import random
from collections import Counter

from services.router.balancer import order_replicas, rendezvous
from services.router.breaker import Breaker


def test_every_replica_listed_once_for_failover() -> None:
    reps = ["a", "b", "c", "d"]
    for seed in range(20):
        out = order_replicas(reps, {}, {}, rng=random.Random(seed))
        assert sorted(out) == reps


def test_two_choices_prefer_the_less_loaded() -> None:
    reps = ["a", "b"]
    assert order_replicas(reps, {"a": 5}, {}, rng=random.Random(1))[0] == "b"
    assert order_replicas(reps, {}, {"b": 7.0}, rng=random.Random(1))[0] == "a"
    # Router in-flight and engine-reported load add up.
    assert order_replicas(reps, {"a": 3}, {"b": 2.0}, rng=random.Random(1))[0] == "b"


def test_load_spreads_over_equal_replicas() -> None:
    rng = random.Random(7)
    firsts = Counter(order_replicas(["a", "b", "c"], {}, {}, rng=rng)[0] for _ in range(3000))
    assert all(800 < n < 1200 for n in firsts.values()), firsts


def test_heavily_loaded_replica_is_rarely_first() -> None:
    rng = random.Random(3)
    load = {"hot": 50}
    firsts = Counter(order_replicas(["hot", "x", "y"], load, {}, rng=rng)[0] for _ in range(600))
    assert firsts["hot"] == 0  # it always loses its pairing


def test_affinity_is_stable_and_consistent() -> None:
    reps = ["a", "b", "c", "d"]
    chosen = {k: order_replicas(reps, {}, {}, affinity=k)[0] for k in map(str, range(200))}
    again = {k: order_replicas(reps, {"a": 99}, {}, affinity=k)[0] for k in chosen}
    assert chosen == again  # load does not move a conversation
    # Removing one replica moves only the keys that were on it.
    fewer = {k: rendezvous(["a", "b", "c"], k)[0] for k in chosen}
    moved = [k for k in chosen if chosen[k] != fewer[k]]
    assert moved and all(chosen[k] == "d" for k in moved)


def test_breaker_ejects_then_half_opens() -> None:
    b = Breaker(threshold=2, cooldown_s=10)
    b.failure("m", "a", now=0)
    assert b.allowed("m", ["a", "b"], now=1) == ["a", "b"]
    b.failure("m", "a", now=1)
    assert b.allowed("m", ["a", "b"], now=2) == ["b"]
    assert b.view(now=2) == [{"model": "m", "worker": "a", "seconds_left": 9.0}]
    assert b.allowed("m", ["a"], now=2) == ["a"]  # all ejected: try anyway
    assert b.allowed("m", ["a", "b"], now=12) == ["a", "b"]  # cool-down over: half-open
    b.failure("m", "a", now=12)
    assert b.allowed("m", ["a", "b"], now=13) == ["b"]  # one failure ejects again
    b.success("m", "b")
    assert ("m", "b") not in b.failures


def test_breaker_is_per_model_on_a_worker() -> None:
    """Model A failing on worker w1 ejects A's replica there, not w1 for every model."""
    b = Breaker(threshold=2, cooldown_s=10)
    for t in (0, 1):
        b.failure("A", "w1", now=t)
    assert b.allowed("A", ["w1", "w2"], now=2) == ["w2"]
    assert b.allowed("B", ["w1", "w2"], now=2) == ["w1", "w2"]
    b.success("B", "w1")  # B succeeding on w1 does not close A's breaker there
    assert b.allowed("A", ["w1", "w2"], now=3) == ["w2"]
    assert [(e["model"], e["worker"]) for e in b.view(now=3)] == [("A", "w1")]
