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

from tests.integration.keys_support import ADMIN, ADMIN_H, create_key, serving
from tests.integration.keys_support import chat as key_chat
from tests.support import (
    Cluster,
    Proc,
    chat,
    engine_address,
    engines,
    register,
    running_on,
    sim_stats,
    status,
    wait_serving,
    wait_until,
)


def one_replica(cluster: Cluster, alias: str, router_env: dict[str, str] | None = None,
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


def in_flight(router: Proc, alias: str) -> dict[str, Any] | None:
    return queues(router).get(alias)


def at_once(router: Proc, alias: str, n: int, **extra: Any) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: chat(router, alias, **extra), range(n)))


def peak_running(port: str, stop: threading.Event) -> list[int]:
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
    router = one_replica(cluster, "capped", max_inflight=2, extra_args=["--ttft", "0.4"])
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
    router = one_replica(cluster, "slow2", env, max_inflight=1, extra_args=["--ttft", "4"])
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


# --- with API keys: tenants and priorities ---------------------------------------------------


def keyed(cluster: Cluster, alias: str, **spec: Any) -> Proc:
    cluster.extra_env.update({"ADMIN_TOKEN": ADMIN})
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, alias, token=ADMIN, engine="sim", **spec).status_code == 201
    return router


def queued_now(router: Proc, alias: str) -> int:
    r = httpx.get(f"{router.url}/admin/status", headers=ADMIN_H, timeout=10).json()
    return int(r["router"]["queues"].get(alias, {}).get("queued", 0))


def queued_is(router: Proc, alias: str, n: int) -> bool:
    return queued_now(router, alias) == n


def test_a_small_tenant_is_not_stuck_behind_a_big_ones_backlog(cluster: Cluster) -> None:
    router = keyed(cluster, "shared", max_inflight=1, extra_args=["--ttft", "0.8"])
    a = create_key(router, name="a", tenant="big")["key"]
    b = create_key(router, name="b", tenant="small")["key"]
    serving([router], "shared", a)
    finished: list[str] = []

    def send(who: str, key: str) -> None:
        assert key_chat(router, "shared", key).status_code == 200
        finished.append(who)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        big = [pool.submit(send, f"a{i}", a) for i in range(8)]
        wait_until(lambda: queued_now(router, "shared") >= 5, 10, interval=0.05,
                   what="the big tenant's backlog queued")
        before = len(finished)
        small = pool.submit(send, "b", b)
        for f in [*big, small]:
            f.result()
    # B arrives behind at least five of A's queued requests: it goes next, or next but one
    # when the tie with A's counter goes A's way (A's requests take 0.8 s: at most one more
    # ends while B is being sent).
    assert finished.index("b") <= before + 2, finished


def test_queued_requests_go_by_key_priority(cluster: Cluster) -> None:
    # Long enough for the three to queue behind the first while the machine is loaded.
    router = keyed(cluster, "ranked", max_inflight=1, extra_args=["--ttft", "2"])
    keys = {p: create_key(router, name=p, tenant="t", priority=p)["key"]
            for p in ("high", "normal", "low")}
    serving([router], "ranked", keys["normal"])
    finished: list[str] = []

    def send(who: str) -> None:
        assert key_chat(router, "ranked", keys[who]).status_code == 200
        finished.append(who)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(key_chat, router, "ranked", keys["normal"])
        wait_until(lambda: status(router, ADMIN)["router"]["queues"].get("ranked"), 5,
                   interval=0.02, what="the first request in flight")
        waiting = []
        for n, who in enumerate(("low", "normal", "high"), start=1):
            waiting.append(pool.submit(send, who))
            wait_until(partial(queued_is, router, "ranked", n), 10, interval=0.02,
                       what=f"{n} queued")
        assert first.result().status_code == 200
        for f in waiting:
            f.result()
    assert finished == ["high", "normal", "low"]


def test_the_keys_priority_reaches_a_priority_scheduling_engine(cluster: Cluster) -> None:
    router = keyed(cluster, "vprio", extra_args=["--scheduling-policy", "priority"])
    high = create_key(router, name="h", tenant="t", priority="high")["key"]
    low = create_key(router, name="l", tenant="t", priority="low")["key"]
    serving([router], "vprio", high)
    port = next(engine_address(i) for m in status(router, ADMIN)["models"]
                if m["alias"] == "vprio" for i in m["instances"] if i["state"] == "RUNNING")
    assert key_chat(router, "vprio", high, priority=50).status_code == 200
    assert sim_stats(port)["last_priority"] == -10
    assert key_chat(router, "vprio", low, stream=True).status_code == 200
    assert sim_stats(port)["last_priority"] == 10


def test_routers_split_a_replicas_max_inflight(cluster: Cluster) -> None:
    """Two routers (ROUTER_COUNT unset: the routers checking in) take one of a replica's two
    slots each: eight requests over both never put more than two on the engine."""
    cluster.manager()
    cluster.worker("w1")
    routers = [cluster.router("r0"), cluster.router("r1")]
    assert register(routers[0], "split", engine="sim", max_inflight=2,
                    extra_args=["--ttft", "0.5"]).status_code == 201
    wait_until(lambda: running_on(routers[0], "split") == ["w1"], 30, what="split running")
    for r in routers:
        wait_serving(r, "split")
    port = engines(routers[0], "split")["w1"]
    stop = threading.Event()
    seen = peak_running(port, stop)
    slots: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, r, "split") for r in routers for _ in range(4)]
        for r in routers:
            view = wait_until(partial(in_flight, r, "split"), 5, interval=0.02,
                              what=f"requests in flight on {r.name}")
            slots.append(int(view["slots"]))
        answers = [f.result() for f in futures]
    stop.set()
    assert [a.status_code for a in answers] == [200] * 8
    assert slots == [1, 1]
    assert max(seen) <= 2
