"""Worker death, two managers, and restarts of manager and router processes."""

from __future__ import annotations

import time

import httpx

from shared import procs
from tests.support import (
    Cluster,
    chat,
    model_status,
    register,
    running_on,
    status,
    stays,
    wait_serving,
    wait_until,
)


def test_kill9_worker_moves_model_to_other_worker(cluster: Cluster) -> None:
    cluster.manager()
    workers = {"w1": cluster.worker("w1"), "w2": cluster.worker("w2")}
    router = cluster.router()
    assert register(router, "m", engine="sim").status_code == 201
    first = wait_until(lambda: running_on(router, "m"), 20, what="m running")
    assert len(first) == 1
    victim, survivor = first[0], ({"w1", "w2"} - {first[0]}).pop()
    pid = int(model_status(router, "m")["instances"][0]["pid"])  # type: ignore[index]

    killed_at = time.monotonic()
    workers[victim].kill9()
    # The engine's keeper ends it when its worker dies: no orphan keeps (GPU) memory.
    wait_until(lambda: not procs.group_alive(pid), 5, what="orphaned engine gone")

    def moved() -> bool:
        return running_on(router, "m") == [survivor]

    wait_until(moved, 20, what="m re-placed on the survivor")
    routes_gone_after = time.monotonic() - killed_at
    wait_serving(router, "m", 10)
    r = chat(router, "m")
    assert r.status_code == 200 and r.json()["model"] == "m"
    dead = next(w for w in status(router)["workers"] if w["worker_id"] == victim)
    assert dead["alive"] is False
    # TTL is 1.5 s plus one scheduler pass and an engine start; generous bound for a slow CI.
    assert routes_gone_after < 20


def test_two_managers_place_each_model_exactly_once(cluster: Cluster) -> None:
    cluster.manager("mgr-a")
    cluster.manager("mgr-b")
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    aliases = [f"m{i}" for i in range(6)]
    for a in aliases:
        assert register(router, a, engine="sim").status_code == 201

    def all_running() -> bool:
        return all(len(running_on(router, a)) == 1 for a in aliases)

    wait_until(all_running, 30, what="all models running")
    leaders = [
        httpx.get(f"{p.url}/health").json()["leader"]
        for p in cluster.procs if p.name.startswith("mgr")
    ]
    assert sorted(leaders) == [False, True]
    # Hold the state for a few scheduler passes: still exactly one instance each.
    def one_each() -> bool:
        return all(len(model_status(router, a)["instances"]) == 1  # type: ignore[index]
                   for a in aliases)

    stays(one_each, 2.0, interval=0.2, what="exactly one instance per model")


def test_standby_manager_takes_over(cluster: Cluster) -> None:
    a = cluster.manager("mgr-a")
    cluster.worker("w1")
    router = cluster.router()
    wait_until(lambda: httpx.get(f"{a.url}/health").json()["leader"], 10, what="a leads")
    b = cluster.manager("mgr-b")
    a.kill9()  # no lease release: b must wait out the TTL
    wait_until(lambda: httpx.get(f"{b.url}/health").json()["leader"], 10, what="b leads")
    assert register(router, "late", engine="sim").status_code == 201
    wait_serving(router, "late", 20)


def test_restart_manager_and_router_loses_nothing(cluster: Cluster) -> None:
    mgr = cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    for a in ("x", "y"):
        assert register(router, a, engine="sim").status_code == 201
    wait_serving(router, "x")
    wait_serving(router, "y")
    before = {m["alias"]: m["spec"] for m in status(router)["models"]}

    mgr.stop()
    router.stop()
    router2 = cluster.router("router2")
    cluster.manager("manager2")
    after = {m["alias"]: m["spec"] for m in status(router2)["models"]}
    assert after == before
    # The engines kept running through the restarts; the new router serves at once.
    assert chat(router2, "x").status_code == 200
    assert chat(router2, "y").status_code == 200
    assert register(router2, "z", engine="sim").status_code == 201
    wait_serving(router2, "z")


def test_converges_without_pubsub_hints(cluster: Cluster) -> None:
    cluster.extra_env["EVENTS_ENABLED"] = "false"
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    other_router = cluster.router("router-b")
    assert register(router, "quiet", engine="sim").status_code == 201
    # No hints at all: the manager, worker and the *other* router converge on timers alone.
    wait_serving(other_router, "quiet", 20)
    assert httpx.delete(f"{router.url}/admin/models/quiet").status_code == 200
    wait_until(lambda: chat(other_router, "quiet").status_code == 404, 10,
               what="other router forgets the model")
