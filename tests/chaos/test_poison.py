"""Corrupt Redis records in a live pool (real redis-server, manager, two workers, a router,
simulated engines): one bad record used to stop the whole pool (admin reads 500, every
scheduler pass and worker reconcile failing, route publishing stopped). Each corruption
below, applied on top of the previous ones, must leave every other model serving, new models
being placed, and ``/admin/status`` naming the bad key."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.support import Cluster, Proc, chat, register, status, wait_serving, wait_until

# Fault injection measures recovery under load: the chaos tests run one at a time, on one
# pytest-xdist worker (tests on the other workers still load the machine).
pytestmark = [pytest.mark.chaos, pytest.mark.xdist_group("chaos")]


def named(router: Proc, key: str, field: str | None) -> bool:
    return any(p["key"] == key and p["field"] == field for p in status(router)["problems"])


def still_works(router: Proc, serving: list[str], new: str) -> None:
    """The admin reads answer, every model that served still serves, and a new model is
    registered, placed and served, then deleted (so engines do not pile up)."""
    assert httpx.get(f"{router.url}/admin/models", timeout=10).status_code == 200
    assert httpx.get(f"{router.url}/v1/models", timeout=10).status_code == 200
    assert register(router, new, engine="sim").status_code == 201, new
    wait_serving(router, new, timeout=30)
    for alias in serving:
        assert chat(router, alias).status_code == 200, alias
    assert httpx.delete(f"{router.url}/admin/models/{new}", timeout=10).status_code == 200


def routes_quiet(r: redis.Redis, key: str) -> bool:
    """The routes version did not move for a second (no stop or start still writing)."""
    before = r.get(key)
    time.sleep(1.0)
    return bool(r.get(key) == before)


def test_corrupt_records_cost_only_themselves(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    for alias in ("a", "b", "victim"):
        assert register(router, alias, engine="sim").status_code == 201
    for alias in ("a", "b", "victim"):
        wait_serving(router, alias)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    k = Keys(cluster.prefix)
    on_w1 = next(m["alias"] for m in status(router)["models"]
                 if any(i["worker_id"] == "w1" for i in m["instances"]))
    steps: list[tuple[str, Callable[[], Any], str, str | None]] = [
        ("model spec", lambda: r.hset(k.model("victim"), "spec", "garbage{"),
         k.model("victim"), "spec"),
        ("instance inflight", lambda: r.hset(k.instance(on_w1, "w1"), "inflight", "abc"),
         k.instance(on_w1, "w1"), "inflight"),
        ("assignment", lambda: r.hset(k.assign("w1"), "ghost", "garbage{"),
         k.assign("w1"), "ghost"),
        ("ledger entry", lambda: r.hset(k.ledger("w1"), "ghost", "garbage{"),
         k.ledger("w1"), "ghost"),
        ("routes version", lambda: r.set(k.routes_version, "abc"),
         k.routes_version, None),
        ("worker engines", lambda: r.hset(k.worker("w2"), "engines", "garbage{"),
         k.worker("w2"), "engines"),
    ]
    try:
        for i, (what, corrupt, key, field) in enumerate(steps):
            corrupt()
            wait_until(lambda key=key, field=field: named(router, key, field), 10,  # type: ignore[misc]
                       what=f"/admin/status naming {key} [{field}] ({what})")
            # The victim too keeps serving: its record is unreadable, not deleted.
            still_works(router, ["a", "b", "victim"], f"new{i}")
            # Its engine gone, so no route change is pending (one repairs a bad counter): the
            # deletion removes the records at once, the worker's stop writes after it.
            wait_until(lambda i=i: not r.keys(k.instance(f"new{i}", "*")), 15,  # type: ignore[misc]
                       what=f"new{i} stopped")
            wait_until(lambda: routes_quiet(r, k.routes_version), 15,
                       what="no route change pending")
    finally:
        r.close()
    # No pass failed along the way, and each bad record was logged, not once per pass.
    logs = {proc.name: proc.log.read_text() for proc in cluster.procs}
    assert "scheduler pass failed" not in logs["manager"]
    assert "reconcile failed" not in logs["w1"] + logs["w2"]
    assert logs["manager"].count(f"{k.model('victim')} [spec]") == 1
