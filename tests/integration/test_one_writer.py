"""One writer for assignments: operators' actions are requests the scheduler carries out, so
racing them against scheduler placements ends as the last request says, and manual placements
reserve GPU memory like any other."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import httpx
import redis

from shared.keys import Keys
from tests.support import Cluster, Proc, model_status, register, running_on, stays, wait_until

TOTAL_MB, FOREIGN_MB = 81920, 2048
GPU = {"index": 0, "uuid": "GPU-fake-0", "name": "Fake H100", "memory_total_mb": TOTAL_MB,
       "memory_used_mb": FOREIGN_MB}
FAKE = {"GPU_BACKEND": "fake", "FAKE_GPUS": json.dumps([GPU]), "WORKER_ENGINES": "sim"}


class Pool:
    """What Redis and the worker say: assignments, ledger, engines running."""

    def __init__(self, cluster: Cluster, worker: Proc, worker_id: str) -> None:
        self.r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
        self.prefix, self.worker, self.wid = cluster.prefix, worker, worker_id

    def assigned(self) -> set[str]:
        return {str(k) for k in self.r.hkeys(Keys(self.prefix).assign(self.wid))}

    def ledger(self) -> dict[str, Any]:
        raw = self.r.hgetall(Keys(self.prefix).ledger(self.wid))
        return {str(a): json.loads(v) for a, v in raw.items()}

    def engines(self) -> set[str]:
        info = httpx.get(f"{self.worker.url}/info", timeout=5).json()
        return {i["alias"] for i in info["instances"] if i["state"] == "RUNNING"}

    def reserved_mb(self) -> int:
        return sum(r["mb_per_gpu"] for r in self.ledger().values() if 0 in r["gpus"])


def reason(router: Proc, alias: str) -> str:
    m = model_status(router, alias)
    return str(m["placement"] or "") if m else ""


def test_manual_and_scheduled_placements_share_the_gpu_ledger(cluster: Cluster) -> None:
    cluster.manager()
    worker = cluster.worker("gpu1", **FAKE)
    router = cluster.router()
    pool = Pool(cluster, worker, "gpu1")
    free = TOTAL_MB - FOREIGN_MB
    assert register(router, "a", engine="sim", gpu_memory_mb=50000).status_code == 201
    assert register(router, "b", engine="sim", gpu_memory_mb=50000,
                    min_replicas=0).status_code == 201
    wait_until(lambda: running_on(router, "a") == ["gpu1"], 20, what="a scheduled")

    # A manual placement that does not fit next to the scheduled one is refused, not started.
    start = httpx.post(f"{worker.url}/instances/start", json={"alias": "b"})
    assert start.status_code == 202, start.text
    why = wait_until(lambda: reason(router, "b"), 10, what="b refused")
    assert "manual placement refused" in why and "50000 MB free" in why, why
    stays(lambda: running_on(router, "b") == [] and pool.reserved_mb() <= free, 1.0,
          what="b not started, GPU not overcommitted")

    # Once a is gone, b is placed by hand with its reservation in the ledger ...
    assert httpx.delete(f"{router.url}/admin/models/a").status_code == 200
    wait_until(lambda: running_on(router, "b") == ["gpu1"], 20, what="b placed by hand")
    assert pool.ledger()["b"]["gpus"] == [0] and pool.ledger()["b"]["mb_per_gpu"] == 50000
    # ... so a scheduled model that would not fit next to it is refused in turn.
    assert register(router, "c", engine="sim", gpu_memory_mb=50000).status_code == 201
    why = wait_until(lambda: reason(router, "c"), 10, what="c refused")
    assert "needs 1 GPU(s) with 50000 MB free" in why, why
    stays(lambda: running_on(router, "c") == [] and pool.reserved_mb() <= free, 1.0,
          what="c not placed, GPU not overcommitted")
    assert pool.engines() == {"b"} == set(pool.ledger())
    pool.r.close()


def test_admin_stop_wake_racing_the_scheduler_ends_as_the_last_request(
    cluster: Cluster,
) -> None:
    cluster.manager()
    worker = cluster.worker("w1", **FAKE)
    router = cluster.router()
    pool = Pool(cluster, worker, "w1")
    aliases = [f"r{i}" for i in range(4)]
    for a in aliases:
        assert register(router, a, engine="sim", gpu_memory_mb=15000).status_code == 201
    wait_until(lambda: pool.assigned() == set(aliases), 20, what="all placed")

    last: dict[str, str] = {}
    errors: list[str] = []
    rng = random.Random(7)

    def hammer() -> None:
        deadline = time.monotonic() + 12.0
        with httpx.Client(timeout=10) as c:
            while time.monotonic() < deadline:
                alias, action = rng.choice(aliases), rng.choice(("stop", "wake"))
                r = c.post(f"{router.url}/admin/models/{alias}/{action}")
                if r.status_code != 202:
                    errors.append(f"{alias}/{action}: {r.status_code} {r.text}")
                last[alias] = action
                time.sleep(rng.uniform(0, 0.05))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not errors, errors[:5]
    want = {a for a in aliases if last.get(a, "wake") == "wake"}

    def settled() -> bool:
        ledger = set(pool.ledger())
        return pool.assigned() == want and ledger == want and pool.engines() == want

    try:
        wait_until(settled, 30, what=f"assignments, ledger and engines == {sorted(want)}")
        stays(settled, 1.5, interval=0.1, what="the last request holds")
    finally:
        print("last requests:", last, "assigned:", pool.assigned(), "ledger:",
              set(pool.ledger()))
        pool.r.close()
