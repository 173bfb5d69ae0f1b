"""Sim engine knobs that mimic real vLLM, and the pool's exact load from them."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import redis

from services.worker.engines.metrics import engine_load
from shared.keys import Keys
from shared.procs import stop
from tests.integration.test_sim_engine import MODEL, start_engine
from tests.support import Cluster, register, running_on, wait_until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_fail_health_after_keeps_serving_http_with_errors(tmp_path: Path) -> None:
    engine = start_engine(tmp_path / "e.log", "--fail-health-after", "1.5")
    try:
        assert httpx.post(f"{engine.base}/v1/chat/completions", json=CHAT).status_code == 200
        wait_until(lambda: httpx.get(f"{engine.base}/health").status_code == 503, 10,
                   what="health fails")
        dead = httpx.post(f"{engine.base}/v1/chat/completions", json=CHAT)
        assert dead.status_code == 500 and "EngineCore" in dead.json()["error"]["message"]
        assert httpx.get(f"{engine.base}/v1/models").status_code == 200  # the API server lives
        revived = httpx.post(f"{engine.base}/sim/fault", json={"dead": False})
        assert revived.json() == {"dead": False}
        assert httpx.get(f"{engine.base}/health").status_code == 200
        assert httpx.post(f"{engine.base}/v1/chat/completions", json=CHAT).status_code == 200
        assert httpx.post(f"{engine.base}/sim/fault", json={"dead": "yes"}).status_code == 400
        assert httpx.post(f"{engine.base}/sim/fault", json={"dead": True}).status_code == 200
        assert httpx.get(f"{engine.base}/health").status_code == 503
    finally:
        stop(engine.proc)


def test_waiting_requests_and_by_reason_metrics(tmp_path: Path) -> None:
    engine = start_engine(tmp_path / "e.log", "--max-num-seqs", "1", "--ttft", "3")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, f"{engine.base}/v1/chat/completions",
                                   json=CHAT, timeout=30) for _ in range(4)]

            def four() -> str | None:
                page = httpx.get(f"{engine.base}/metrics").text
                return page if engine_load(page) == 4 else None

            page = wait_until(four, 10, what="4 requests in the engine")
            assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 1.0' in page
            assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 3.0' in page
            by_reason = f'vllm:num_requests_waiting_by_reason{{model_name="{MODEL}",reason='
            assert f'{by_reason}"capacity"}} 3.0' in page
            assert f'{by_reason}"deferred"}} 0.0' in page
            assert all(f.result().status_code == 200 for f in futures)
    finally:
        stop(engine.proc)


def test_stored_load_is_running_plus_waiting(cluster: Cluster) -> None:
    """--max-num-seqs 1 and 4 requests: the pool stores 4 (a prefix match on
    vllm:num_requests_waiting also counted the _by_reason lines: 7)."""
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    args = ["--max-num-seqs", "1", "--ttft", "4"]
    assert register(router, "seq", engine="sim", extra_args=args).status_code == 201
    wait_until(lambda: running_on(router, "seq") == ["w1"], 20, what="seq running")
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    body = {"model": "seq", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, f"{router.url}/v1/chat/completions", json=body,
                                   timeout=60) for _ in range(4)]
            seen: list[str | None] = []

            def stored_four() -> bool:
                value = r.hget(Keys(cluster.prefix).load("seq"), "w1")
                seen.append(None if value is None else str(value))
                return seen[-1] == "4"

            wait_until(stored_four, 10, what="stored load 4")
            assert "7" not in seen, seen
            assert all(f.result().status_code == 200 for f in futures)
    finally:
        r.close()
