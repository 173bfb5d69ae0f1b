"""Two replicas behind the real router: requests sharing a long prompt prefix land on one
replica, whose (simulated) prefix cache then hits, different prefixes still spread; and the
new vLLM paths (rerank here) are balanced and failed over like chat."""

from __future__ import annotations

import httpx
import pytest

from services.sim_engine.prefix_cache import BLOCK_CHARS, BLOCK_TOKENS
from tests.integration.test_balancing import engine_stats, start_two_replicas
from tests.support import Cluster, Proc, engine_address, engine_call, model_status


def system_prompt(i: int) -> str:
    return f"System prompt {i}: you are assistant number {i}, careful and brief. " * 6


def ask(router: Proc, system: str, question: str) -> None:
    body = {"model": "px", "max_tokens": 3,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}
    r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text


def prefix_hits(router: Proc) -> float:
    m = model_status(router, "px")
    assert m is not None
    total = 0.0
    for inst in m["instances"]:
        page = engine_call(engine_address(inst), "GET", "/metrics").text
        total += sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                     if line.startswith("vllm:prefix_cache_hits_total{"))
    return total


@pytest.fixture
def two(cluster: Cluster) -> Proc:
    cluster.manager()
    for w in ("w1", "w2"):
        cluster.worker(w)
    router = cluster.router(PREFIX_AFFINITY_CHARS="256")
    start_two_replicas(router, "px")
    return router


def test_same_prefix_sticks_to_one_replica_and_prefixes_spread(two: Proc) -> None:
    router = two
    before = engine_stats(router, "px")
    for q in range(12):
        ask(router, system_prompt(0), f"question {q}?")
    after = engine_stats(router, "px")
    got = sorted(after[w]["requests"] - before[w]["requests"] for w in after)
    assert got == [0, 12], got

    before, hits_before = engine_stats(router, "px"), prefix_hits(router)
    for round_ in range(3):
        for i in range(1, 9):
            ask(router, system_prompt(i), f"round {round_}")
    after = engine_stats(router, "px")
    got = sorted(after[w]["requests"] - before[w]["requests"] for w in after)
    assert sum(got) == 24 and got[0] >= 3, got  # 8 prefixes: both replicas get some
    # Every repeat of a prefix found its blocks cached on the replica it went to.
    shared = len(f"system: {system_prompt(1)}\nuser: round ") // BLOCK_CHARS
    assert prefix_hits(router) - hits_before >= 16 * shared * BLOCK_TOKENS


def test_rerank_spreads_and_fails_over_like_chat(two: Proc) -> None:
    router = two
    body = {"model": "px", "query": "q", "documents": ["a", "b"]}
    before = engine_stats(router, "px")
    for _ in range(20):
        assert httpx.post(f"{router.url}/v1/rerank", json=body, timeout=30).status_code == 200
    after = engine_stats(router, "px")
    assert all(after[w]["requests"] - before[w]["requests"] >= 3 for w in after), after

    dead = sorted(after)[0]
    m = model_status(router, "px")
    assert m is not None
    port = next(engine_address(i) for i in m["instances"] if i["worker_id"] == dead)
    assert engine_call(port, "POST", "/sim/fault", json={"dead": True}).is_success
    for _ in range(10):  # the dead core answers 500: each is retried on the other replica
        r = httpx.post(f"{router.url}/v1/rerank", json=body, timeout=30)
        assert r.status_code == 200, r.text
    tried = engine_call(port, "GET", "/sim/stats").json()["requests"]
    assert tried > after[dead]["requests"]  # it was tried, and failed over
