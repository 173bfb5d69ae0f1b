"""Queueing at max_inflight with real Redis, routers, workers and simulated engines: the
engine never holds more than the cap, the queue's bound (429 queue_full) and deadline (503
queue_timeout), held requests, and vLLM's ``priority`` field passed on only where the engine
schedules by priority."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from functools import partial
from typing import Any

import httpx

from tests.integration.test_datapath import engines, sim_stats
from tests.support import (
    Cluster,
    Proc,
    chat,
    register,
    running_on,
    status,
    wait_serving,
    wait_until,
)


def serving(cluster: Cluster, alias: str, router_env: dict[str, str] | None = None,
            **spec: Any) -> Proc:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router(**(router_env or {}))
    assert register(router, alias, engine="sim", **spec).status_code == 201
    wait_until(lambda: running_on(router, alias) == ["w1"], 30, what=f"{alias} running")
    wait_serving(router, alias)
    return router


def queues(router: Proc) -> dict[str, dict[str, Any]]:
    return dict(status(router)["router"]["queues"])


def at_once(router: Proc, alias: str, n: int, **extra: Any) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: chat(router, alias, **extra), range(n)))


def peak_running(port: int, stop: threading.Event) -> list[int]:
    """Samples of the engine's running requests until ``stop``, in a thread."""
    seen: list[int] = []

    def poll() -> None:
        while not stop.is_set():
            seen.append(int(sim_stats(port)["running"]))
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_a_model_at_its_cap_queues_instead_of_piling_onto_the_engine(
        cluster: Cluster) -> None:
    router = serving(cluster, "capped", max_inflight=2, extra_args=["--ttft", "0.4"])
    port = engines(router, "capped")["w1"]
    stop = threading.Event()
    seen = peak_running(port, stop)
    started = time.monotonic()
    answers = at_once(router, "capped", 6)
    took = time.monotonic() - started
    stop.set()
    assert [a.status_code for a in answers] == [200] * 6
    assert max(seen) == 2  # the engine had two at a time, never more
    assert took >= 3 * 0.4  # six requests, two at a time: three rounds


def test_queue_bound_gives_429_and_deadline_503_with_retry_after(cluster: Cluster) -> None:
    env = {"QUEUE_MAX": "2", "QUEUE_TIMEOUT_S": "2"}
    router = serving(cluster, "slow2", env, max_inflight=1, extra_args=["--ttft", "4"])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(chat, router, "slow2")
        wait_until(lambda: queues(router).get("slow2", {}).get("inflight") == 1, 2,
                   interval=0.02, what="the first request in flight")
        queued = [pool.submit(chat, router, "slow2") for _ in range(2)]
        wait_until(lambda: queues(router)["slow2"]["queued"] == 2, 1, interval=0.02,
                   what="two requests queued")
        t0 = time.monotonic()
        over = chat(router, "slow2")
        assert time.monotonic() - t0 < 0.5  # refused at once, not after a wait
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "queue_full"
        assert int(over.headers["retry-after"]) >= 1
        for f in queued:
            late = f.result()
            assert late.status_code == 503, late.text
            assert late.json()["error"]["code"] == "queue_timeout"
            assert int(late.headers["retry-after"]) >= 1
        assert first.result().status_code == 200
    # The queue is empty again (and forgotten): the next request is served.
    assert queues(router) == {}
    assert chat(router, "slow2").status_code == 200


def test_held_requests_of_a_capped_model_are_served(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "cold", engine="sim", min_replicas=0, max_inflight=1,
                    extra_args=["--ttft", "0.2"]).status_code == 201
    started = time.monotonic()
    answers = at_once(router, "cold", 3)  # held while it starts, then queued at its cap
    assert [a.status_code for a in answers] == [200] * 3
    assert time.monotonic() - started >= 3 * 0.2


def test_priority_field_only_for_engines_that_schedule_by_priority(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "prio", engine="sim", max_inflight=4,
                    extra_args=["--scheduling-policy", "priority"]).status_code == 201
    assert register(router, "fcfs", engine="sim").status_code == 201
    for alias in ("prio", "fcfs"):
        wait_until(partial(running_on, router, alias), 30, what=f"{alias} up")
        wait_serving(router, alias)
    port = engines(router, "prio")["w1"]
    # The key's priority replaces the client's (anonymous: normal, vLLM's 0)...
    assert chat(router, "prio", priority=-100).status_code == 200
    assert sim_stats(port)["last_priority"] == 0
    # ...streamed or not.
    assert chat(router, "prio", priority=7, stream=True).status_code == 200
    assert sim_stats(port)["last_priority"] == 0
    # An engine without priority scheduling gets the body untouched: vLLM refuses it.
    refused = chat(router, "fcfs", priority=3)
    assert refused.status_code == 400 and "Priority scheduling" in refused.text


def test_each_replica_gets_at_most_max_inflight(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    assert register(router, "two", engine="sim", replicas=2, max_inflight=1,
                    extra_args=["--ttft", "0.4"]).status_code == 201
    wait_until(lambda: sorted(running_on(router, "two")) == ["w1", "w2"], 30,
               what="two replicas")
    wait_until(lambda: len(status(router)["router"]["queues"]) == 0 and all(
        a.status_code == 200 for a in at_once(router, "two", 2)), 20, what="both routed")
    stop = threading.Event()
    seen = [peak_running(port, stop) for port in engines(router, "two").values()]
    started = time.monotonic()
    answers = at_once(router, "two", 6)
    took = time.monotonic() - started
    stop.set()
    assert [a.status_code for a in answers] == [200] * 6
    assert [max(s) for s in seen] == [1, 1]  # one at a time on each, both used
    assert took >= 3 * 0.4
