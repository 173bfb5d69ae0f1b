"""The simulated engine's batch limit (--enforce-max-num-seqs) and vLLM's priority field: a
saturated replica's latency grows with its load, and waiting sequences start by priority
under --scheduling-policy priority (refused, as vLLM refuses it, without)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx

from shared.procs import stop
from tests.integration.test_sim_engine import MODEL, start_engine


def chat(base: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2} | extra
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)


def test_at_most_max_num_seqs_run_and_the_rest_wait(tmp_path: Path) -> None:
    engine = start_engine(tmp_path / "e.log", "--enforce-max-num-seqs", "--max-num-seqs", "2",
                          "--ttft", "0.3")
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: chat(engine.base), range(6)))
        took = time.monotonic() - started
        assert [a.status_code for a in answers] == [200] * 6
        assert took >= 3 * 0.3  # two at a time: three rounds
        assert chat(engine.base, priority=1).status_code == 400  # fcfs: no priority
    finally:
        stop(engine.proc)


def test_waiting_sequences_start_by_priority(tmp_path: Path) -> None:
    engine = start_engine(tmp_path / "e.log", "--enforce-max-num-seqs", "--max-num-seqs", "1",
                          "--ttft", "1.5", "--scheduling-policy", "priority")
    done: list[int] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(chat, engine.base)
            time.sleep(0.3)  # the one seat is taken for 1.5 s; the next three wait

            def one(priority: int) -> None:
                assert chat(engine.base, priority=priority).status_code == 200
                done.append(priority)

            waiting: list[concurrent.futures.Future[Any]] = []
            for p in (5, 0, -5):
                waiting.append(pool.submit(one, p))
                time.sleep(0.2)
            for f in [first, *waiting]:
                f.result()
        assert done == [-5, 0, 5]  # lowest value first, not arrival order
        stats = httpx.get(f"{engine.base}/sim/stats").json()
        assert stats["last_priority"] in (5, 0, -5)
    finally:
        stop(engine.proc)
