"""Replicas: load spreading, affinity, failover, circuit breaking, stream breaks, cancellation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import (
    Cluster,
    Proc,
    chat,
    engine_address,
    engine_call,
    model_status,
    register,
    running_on,
    wait_until,
)


def engine_stats(router: Proc, alias: str) -> dict[str, dict[str, Any]]:
    """worker -> the simulated engine's own counters (requests, aborted, ...)."""
    m = model_status(router, alias)
    assert m is not None
    out = {}
    for inst in m["instances"]:
        if inst["state"] == "RUNNING":
            r = engine_call(engine_address(inst), "GET", "/sim/stats")
            out[inst["worker_id"]] = r.json()
    return out


@pytest.fixture
def two(cluster: Cluster):
    cluster.manager()
    workers = {w: cluster.worker(w) for w in ("w1", "w2")}
    router = cluster.router()
    return cluster, workers, router


def start_two_replicas(router: Proc, alias: str, *extra: str) -> None:
    r = register(router, alias, engine="sim", replicas=2, extra_args=list(extra))
    assert r.status_code == 201, r.text
    wait_until(lambda: sorted(running_on(router, alias)) == ["w1", "w2"], 20,
               what="two replicas")
    wait_until(lambda: len(httpx.get(f"{router.url}/health").json()) and all(
        chat(router, alias).status_code == 200 for _ in range(4)), 10, what="routes seen")


def test_requests_spread_over_replicas_and_affinity_sticks(two) -> None:
    _, _, router = two
    start_two_replicas(router, "spread")
    before = engine_stats(router, "spread")
    for _ in range(40):
        assert chat(router, "spread").status_code == 200
    after = engine_stats(router, "spread")
    got = {w: after[w]["requests"] - before[w]["requests"] for w in after}
    assert all(n >= 8 for n in got.values()), got

    before = engine_stats(router, "spread")
    for _ in range(10):
        assert chat(router, "spread", user="alice").status_code == 200
    after = engine_stats(router, "spread")
    got = {w: after[w]["requests"] - before[w]["requests"] for w in after}
    assert sorted(got.values()) == [0, 10], got


def test_dead_replica_is_retried_around_and_ejected(cluster: Cluster) -> None:
    cluster.manager()
    # w1's heartbeat outlives it by 10 s, not the suite's 1.5 s: on a loaded machine the 20
    # requests below took longer than that, the route was gone before one picked w1.
    workers = {"w1": cluster.worker("w1", HEARTBEAT_TTL_S="10"), "w2": cluster.worker("w2")}
    router = cluster.router()
    start_two_replicas(router, "fo")
    workers["w1"].kill9()
    # Before the heartbeat TTL runs out the route to w1 is still published: every request
    # that picks it must be retried on w2, invisibly to the client.
    codes = [chat(router, "fo").status_code for _ in range(20)]
    assert codes == [200] * 20
    st = httpx.get(f"{router.url}/admin/status").json()
    assert {"model": "fo", "worker": "w1"} in [
        {k: e[k] for k in ("model", "worker")} for e in st["router"]["ejected"]]


def sse_events(resp: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_stream_broken_midway_ends_with_error_not_glued_output(two) -> None:
    _, workers, router = two
    start_two_replicas(router, "brk", "--itl", "0.05")
    body = {"model": "brk", "stream": True, "max_tokens": 60,
            "messages": [{"role": "user", "content": "long story"}]}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      timeout=30) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        serving = None
        for w, stats in engine_stats(router, "brk").items():
            if stats["running"]:
                serving = w
        assert serving is not None
        workers[serving].kill9()
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "stream_interrupted"
    chunks = events[:-1]
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # one answer, never a retried second one glued on
    assert len({c["id"] for c in chunks}) == 1
    assert len(chunks) < 60


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_generation(cluster: Cluster, stream: bool) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "cx", engine="sim", extra_args=["--itl", "0.05"]).status_code == 201
    wait_until(lambda: running_on(router, "cx"), 20, what="running")
    body = {"model": "cx", "stream": stream, "max_tokens": 200,
            "messages": [{"role": "user", "content": "go"}]}
    if stream:
        with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                          timeout=30) as resp:
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=0.5)

    def aborted() -> bool:
        (stats,) = engine_stats(router, "cx").values()
        return bool(stats["aborted"] == 1 and stats["running"] == 0)

    wait_until(aborted, 10, what="generation aborted at the engine")


def test_replicas_scale_out_under_load_and_back_in(cluster: Cluster) -> None:
    cluster.manager(SCALE_OUT_S="0.3", SCALE_IN_S="1.0")
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    assert register(router, "auto", engine="sim", replicas=1, max_replicas=2,
                    target_inflight=2, extra_args=["--itl", "0.05"]).status_code == 201
    wait_until(lambda: len(running_on(router, "auto")) == 1, 20, what="one replica")
    body = {"model": "auto", "max_tokens": 80, "messages": [{"role": "user", "content": "x"}]}

    def long_request(_: int) -> int:
        return httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        results = pool.map(long_request, range(8))
        wait_until(lambda: len(running_on(router, "auto")) == 2, 20, what="scaled out to 2")
        assert list(results) == [200] * 8
    wait_until(lambda: len(running_on(router, "auto")) == 1, 20, what="scaled back in to 1")
