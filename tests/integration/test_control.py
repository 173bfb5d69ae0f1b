"""Manual placement, tokens, registration through the manager, and a Redis outage."""

from __future__ import annotations

import httpx

from tests.support import (
    Cluster,
    RedisServer,
    chat,
    free_port,
    model_status,
    register,
    running_on,
    status,
    stays,
    wait_serving,
    wait_until,
)


def test_manual_start_and_stop_are_respected(cluster: Cluster) -> None:
    cluster.manager()
    w1 = cluster.worker("w1")
    w2 = cluster.worker("w2")
    router = cluster.router()
    assert register(router, "pinned", engine="sim", worker_id="w1").status_code == 201
    wait_until(lambda: running_on(router, "pinned") == ["w1"], 20, what="pinned on w1")

    # A manual start on w2 adds a replica there; the scheduler must not undo it.
    r = httpx.post(f"{w2.url}/instances/start", json={"alias": "pinned"})
    assert r.status_code == 202, r.text
    wait_until(lambda: sorted(running_on(router, "pinned")) == ["w1", "w2"], 20,
               what="manual replica on w2")
    # Several scheduler passes (0.3 s each) must leave both in place.
    stays(lambda: sorted(running_on(router, "pinned")) == ["w1", "w2"], 1.0, what="both kept")

    # A manual stop on both: the scheduler must not place it again.
    for w in (w1, w2):
        assert httpx.post(f"{w.url}/instances/pinned/stop").status_code == 202
    wait_until(lambda: running_on(router, "pinned") == [], 20, what="stopped everywhere")
    stays(lambda: running_on(router, "pinned") == [], 1.0, what="not placed again")
    m = model_status(router, "pinned")
    assert m is not None and m["held"] and m["instances"] == []
    r = chat(router, "pinned")
    assert r.status_code == 503 and "stopped manually" in r.json()["error"]["message"]

    assert httpx.post(f"{w1.url}/instances/start", json={"alias": "pinned"}).status_code == 202
    wait_serving(router, "pinned")


def test_unplaceable_model_explains_why(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "big", engine="vllm", model_name="org/big").status_code == 201

    def reason() -> str | None:
        m = model_status(router, "big")
        return m["placement"] if m else None

    text = wait_until(reason, 10, what="placement reason")
    assert "engine 'vllm' not available" in text
    r = chat(router, "big")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "cannot be placed" in r.json()["error"]["message"]


def test_internal_token_and_registration_through_manager(cluster: Cluster) -> None:
    cluster.extra_env["INTERNAL_TOKEN"] = "inside"
    mgr = cluster.manager()
    worker = cluster.worker("w1", MANAGER_URL=mgr.url)
    router = cluster.router()
    assert register(router, "tok", engine="sim").status_code == 201
    wait_serving(router, "tok")
    workers = httpx.get(f"{mgr.url}/workers", headers={"authorization": "Bearer inside"})
    assert [w["worker_id"] for w in workers.json()["workers"]] == ["w1"]
    body = {"model": "tok", "messages": [{"role": "user", "content": "x"}]}
    direct = httpx.post(f"{worker.url}/proxy/tok/v1/chat/completions", json=body)
    assert direct.status_code == 401
    assert httpx.post(f"{mgr.url}/workers/register", json={}).status_code == 401
    hb = httpx.post(f"{mgr.url}/workers/ghost/heartbeat", json={},
                    headers={"authorization": "Bearer inside"})
    assert hb.status_code == 404


def test_router_serves_from_cache_while_redis_is_down(cluster: Cluster, tmp_path) -> None:
    own = RedisServer(free_port(), tmp_path / "r").start()
    try:
        cluster.redis_url = own.url
        cluster.manager()
        cluster.worker("w1")
        router = cluster.router()
        assert register(router, "cached", engine="sim").status_code == 201
        wait_serving(router, "cached")
        own.stop()
        for _ in range(5):
            assert chat(router, "cached").status_code == 200
        r = register(router, "new", engine="sim")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(f"{router.url}/admin/status").status_code == 503
    finally:
        own.stop()


def test_status_shows_workers_gpus_and_instances(cluster: Cluster) -> None:
    cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "s", engine="sim").status_code == 201
    wait_serving(router, "s")
    st = status(router)
    (w,) = st["workers"]
    assert w["alive"] and w["engines"] == ["sim"] and w["gpus"] == []
    assert "no GPU" in w["gpu_message"]
    (m,) = st["models"]
    (inst,) = m["instances"]
    assert inst["worker_id"] == "w1" and inst["state"] == "RUNNING" and inst["engine"] == "sim"
    info = httpx.get(f"{worker.url}/info").json()
    assert "no GPU" in info["gpu_message"]
    assert [i["alias"] for i in info["instances"]] == ["s"]
    assert st["scheduler"]["lease"].startswith("manager|")
