"""The router's data path with replicas: engine 500s retried and counted per (model, worker),
and the x-request-id every answer carries, on the fast lane and through ASGI."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import (
    Cluster,
    Proc,
    chat,
    engines,
    register,
    running_on,
    sim_stats,
    wait_until,
)


def two_replicas(router: Proc, alias: str) -> dict[str, int]:
    assert register(router, alias, engine="sim", replicas=2).status_code == 201
    wait_until(lambda: sorted(running_on(router, alias)) == ["w1", "w2"], 30,
               what=f"two replicas of {alias}")
    wait_until(lambda: all(chat(router, alias).status_code == 200 for _ in range(4)), 10,
               what=f"routes of {alias} seen")
    return engines(router, alias)


def stream_text(router: Proc, alias: str) -> tuple[int, str]:
    body = {"model": alias, "stream": True, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      timeout=30) as resp:
        text = "".join(resp.iter_text())
    return resp.status_code, text


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_engine_500_is_retried_and_ejects_only_that_models_replica(
    cluster: Cluster, fast_lane: str
) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router(FAST_LANE=fast_lane, BREAKER_COOLDOWN_S="120")
    flaky = two_replicas(router, "flaky")
    steady = two_replicas(router, "steady")
    # The engine's API server answers, but every request on w1 fails with a 500 (an engine
    # core that died behind a live API server).
    r = httpx.post(f"http://127.0.0.1:{flaky['w1']}/sim/faults", json={"fail_rate": 1.0})
    assert r.status_code == 200

    codes = [chat(router, "flaky").status_code for _ in range(20)]
    assert codes == [200] * 20  # no client sees the 500: retried on w2 before any byte
    for _ in range(5):
        code, text = stream_text(router, "flaky")
        assert code == 200 and "[DONE]" in text and "error" not in text
    ejected = httpx.get(f"{router.url}/admin/status").json()["router"]["ejected"]
    assert [(e["model"], e["worker"]) for e in ejected] == [("flaky", "w1")]

    # The breaker is per (model, worker): steady keeps being routed to w1.
    before = sim_stats(steady["w1"])["requests"]
    assert all(chat(router, "steady").status_code == 200 for _ in range(20))
    assert sim_stats(steady["w1"])["requests"] - before >= 3


def test_every_replica_failing_gives_a_502_with_the_reason(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    ports = two_replicas(router, "down")
    for port in ports.values():
        httpx.post(f"http://127.0.0.1:{port}/sim/faults", json={"fail_rate": 1.0})
    r = chat(router, "down")
    assert r.status_code == 502, r.text
    assert "simulated engine failure" in r.json()["error"]["message"]


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_every_answer_carries_the_request_id(cluster: Cluster, fast_lane: str) -> None:
    cluster.extra_env["INTERNAL_TOKEN"] = "inner"
    cluster.manager()
    worker = cluster.worker("w1", FAST_LANE=fast_lane)
    router = cluster.router(FAST_LANE=fast_lane)
    assert register(router, "rid", engine="sim").status_code == 201
    wait_until(lambda: chat(router, "rid").status_code == 200, 30, what="rid serving")
    port = engines(router, "rid")["w1"]
    url = f"{router.url}/v1/chat/completions"
    body = {"model": "rid", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    # The client's valid id comes back, and it is the one the engine got.
    for stream in (False, True):
        r = httpx.post(url, json=body | {"stream": stream}, timeout=30,
                       headers={"x-request-id": "trace-7.a:b"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7.a:b"
        assert sim_stats(port)["last_request_id"] == "trace-7.a:b"
    # None sent, or an invalid one: a generated id, the same the engine got.
    for headers in ({}, {"x-request-id": "has space"}, {"x-request-id": "x" * 200}):
        r = httpx.post(url, json=body, timeout=30, headers=headers)
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid != headers.get("x-request-id")
        assert sim_stats(port)["last_request_id"] == rid
    # Errors carry it too: unknown model (404), bad JSON (400), an engine error (400).
    for payload in (json.dumps(body | {"model": "nope"}), "{not json",
                    json.dumps(body | {"messages": []})):
        r = httpx.post(url, content=payload, timeout=30,
                       headers={"x-request-id": "err-1", "content-type": "application/json"})
        assert r.status_code in (400, 404) and r.headers["x-request-id"] == "err-1", r.text
    # The worker's proxy answers with it as well, errors included.
    wurl = f"{worker.url}/proxy/rid/v1/chat/completions"
    auth = {"authorization": "Bearer inner"}
    r = httpx.post(wurl, json=body, headers={"x-request-id": "direct-1"} | auth, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "direct-1"
    r = httpx.post(f"{worker.url}/proxy/other/v1/chat/completions", json=body,
                   headers={"x-request-id": "direct-2"} | auth, timeout=30)
    assert r.status_code == 503 and r.headers["x-request-id"] == "direct-2"
    r = httpx.post(wurl, json=body, headers={"x-request-id": "direct-3"}, timeout=30)
    assert r.status_code == 401 and r.headers["x-request-id"] == "direct-3"
