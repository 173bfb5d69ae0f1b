"""Prefix-aware balancing: the prompt prefix key and the replica order it gives."""

from __future__ import annotations

import random

from services.router.balancer import order_replicas
from services.router.prefix import prefix_key
from services.sim_engine.prefix_cache import BLOCK_CHARS, BLOCK_TOKENS, PrefixCache

SYSTEM = "You are a careful assistant. " * 10  # 290 characters


def chat(*turns: str) -> dict[str, object]:
    roles = ["system"] + ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]}


def test_key_is_the_first_chars_of_the_prompt() -> None:
    a = prefix_key(chat(SYSTEM, "what is 2+2?"), "v1/chat/completions", 256)
    b = prefix_key(chat(SYSTEM, "name a colour"), "v1/chat/completions", 256)
    assert a is not None and a == b
    assert prefix_key(chat("short", "hi"), "v1/chat/completions", 256) is None
    other = prefix_key(chat(SYSTEM.upper(), "what is 2+2?"), "v1/chat/completions", 256)
    assert other != a
    # The role is part of it: the same text as a user turn is another prompt.
    assert prefix_key({"messages": [{"role": "user", "content": SYSTEM}]},
                      "v1/chat/completions", 256) != a


def test_key_reads_text_parts_completions_and_responses() -> None:
    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]}
    plain = {"messages": [{"role": "system", "content": SYSTEM}]}
    assert prefix_key(parts, "v1/chat/completions", 100) == \
        prefix_key(plain, "v1/chat/completions", 100)
    assert prefix_key({"prompt": SYSTEM}, "v1/completions", 100) == SYSTEM[:100]
    assert prefix_key({"prompt": [1, 2]}, "v1/completions", 10) is None
    assert prefix_key({"instructions": SYSTEM, "input": "hi"}, "v1/responses", 50) == SYSTEM[:50]
    assert prefix_key({"messages": "junk"}, "v1/chat/completions", 10) is None


def test_same_prefix_goes_to_one_replica_different_ones_spread() -> None:
    replicas = ["w1", "w2", "w3"]
    rng = random.Random(1)
    firsts = {order_replicas(replicas, {}, {}, prefix="same", rng=rng)[0] for _ in range(20)}
    assert len(firsts) == 1
    spread = {order_replicas(replicas, {}, {}, prefix=f"p{i}", rng=rng)[0] for i in range(60)}
    assert spread == set(replicas)


def test_an_overloaded_prefix_replica_gives_way_to_least_loaded() -> None:
    replicas = ["w1", "w2"]
    chosen = order_replicas(replicas, {}, {}, prefix="hot")[0]
    other = "w2" if chosen == "w1" else "w1"
    assert order_replicas(replicas, {chosen: 4}, {}, prefix="hot", slack=4)[0] == chosen
    assert order_replicas(replicas, {chosen: 5}, {}, prefix="hot", slack=4)[0] == other
    # Reported engine load counts too; an affinity key beats the prefix.
    assert order_replicas(replicas, {}, {chosen: 9.0}, prefix="hot", slack=4)[0] == other
    assert order_replicas(replicas, {}, {}, affinity="u", prefix="hot") == \
        order_replicas(replicas, {}, {}, affinity="u")


def test_sim_prefix_cache_counts_leading_block_hits_and_evicts_lru() -> None:
    cache = PrefixCache(capacity=8)
    prompt = "a" * (4 * BLOCK_CHARS)
    assert cache.lookup(prompt) == 0.0
    assert cache.lookup(prompt + "b" * BLOCK_CHARS) == 4 / 5
    assert (cache.queries, cache.hits) == (9 * BLOCK_TOKENS, 4 * BLOCK_TOKENS)
    # A different first block: nothing after it hits, even the same later text.
    assert cache.lookup("z" * BLOCK_CHARS + prompt[BLOCK_CHARS:]) == 0.0
    for i in range(8):  # fills the cache with other prompts: the first one is evicted
        cache.lookup(str(i) * BLOCK_CHARS)
    assert cache.lookup(prompt) == 0.0
    assert "vllm:prefix_cache_hits_total{m} " in cache.metrics("m")
