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
    b.failure("a", now=0)
    assert b.allowed(["a", "b"], now=1) == ["a", "b"]
    b.failure("a", now=1)
    assert b.allowed(["a", "b"], now=2) == ["b"]
    assert b.view(now=2) == {"a": 9.0}
    assert b.allowed(["a"], now=2) == ["a"]  # all ejected: try anyway
    assert b.allowed(["a", "b"], now=12) == ["a", "b"]  # cool-down over: half-open
    b.failure("a", now=12)
    assert b.allowed(["a", "b"], now=13) == ["b"]  # one failure ejects again
    b.success("b")
    assert "b" not in b.failures
