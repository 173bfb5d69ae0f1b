"""Nothing of a deleted model stays behind: its FAILED instance records and engine logs go,
whether its worker is alive at the deletion or comes back later."""

from __future__ import annotations

import httpx
import redis

from shared.keys import Keys
from tests.support import Cluster, Proc, model_status, register, wait_until


def failed(router: Proc, alias: str) -> bool:
    m = model_status(router, alias)
    return bool(m and [i for i in m["instances"] if i["state"] == "FAILED"])


def test_deleted_models_leave_no_records_or_logs(cluster: Cluster) -> None:
    cluster.manager()
    # A long back-off keeps the instances FAILED (not restarting) for the whole test.
    w1 = cluster.worker("w1", ENGINE_RETRY_BASE_S="60")
    router = cluster.router()
    logs = cluster.tmp / "state" / "w1"
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    k = Keys(cluster.prefix)
    try:
        for alias in ("live", "dead"):
            assert register(router, alias, engine="sim",
                            extra_args=["--fail-startup"]).status_code == 201
            wait_until(lambda a=alias: failed(router, a), 20, what=f"{alias} FAILED")  # type: ignore[misc]
            assert (logs / f"{alias}.log").exists()

        # Worker alive: the record and the log go with the model (the deletion removes the
        # record; the worker's stop of the instance may write STOPPING once more, then deletes).
        assert httpx.delete(f"{router.url}/admin/models/live").status_code == 200
        wait_until(lambda: not r.exists(k.instance("live", "w1"), k.instances("live")), 10,
                   what="live's records removed")
        wait_until(lambda: not (logs / "live.log").exists(), 10, what="live.log removed")

        # Worker dead at the deletion: the record goes at once, the log when it is back.
        w1.kill9()
        assert httpx.delete(f"{router.url}/admin/models/dead").status_code == 200
        assert not r.exists(k.instance("dead", "w1"), k.instances("dead"))
        assert (logs / "dead.log").exists()
        cluster.worker("w1", ENGINE_RETRY_BASE_S="60")
        wait_until(lambda: not (logs / "dead.log").exists(), 10, what="dead.log removed")
        assert not r.exists(k.instance("dead", "w1"))
    finally:
        r.close()
