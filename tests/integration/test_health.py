"""Health-aware replicas: an engine that fails /health while still answering leaves the routes
within one health interval, is restarted per the retry policy, and no client sees a 5xx."""

from __future__ import annotations

import threading
import time

import httpx
import redis

from shared.keys import Keys
from tests.support import (
    Cluster,
    chat,
    engine_address,
    engine_call,
    model_status,
    register,
    running_on,
    wait_until,
)

INTERVAL_S = 1.0
HEALTH_ENV = {"ENGINE_HEALTH_INTERVAL_S": str(INTERVAL_S), "ENGINE_HEALTH_FAILURES": "3"}


class Traffic:
    """Non-streamed chats in a loop on a thread, recording every status."""

    def __init__(self, router_url: str) -> None:
        self.url = router_url
        self.codes: list[int] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        with httpx.Client(timeout=30) as c:
            while not self.done.is_set():
                self.codes.append(c.post(f"{self.url}/v1/chat/completions", json=body)
                                  .status_code)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)


def test_failing_health_withdraws_route_and_restarts(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1", **HEALTH_ENV)
    cluster.worker("w2", **HEALTH_ENV)
    router = cluster.router()
    assert register(router, "m", engine="sim", replicas=2).status_code == 201
    wait_until(lambda: sorted(running_on(router, "m")) == ["w1", "w2"], 30, what="2 replicas")
    wait_until(lambda: chat(router, "m").status_code == 200, 10, what="m serving")
    inst = next(i for i in model_status(router, "m")["instances"]  # type: ignore[index]
                if i["worker_id"] == "w1")
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    routes, instance = Keys(cluster.prefix).routes("m"), Keys(cluster.prefix).instance("m", "w1")
    try:
        assert r.hget(routes, "w1")
        with Traffic(router.url) as traffic:
            wait_until(lambda: len(traffic.codes) >= 5, 10, what="traffic flowing")
            assert engine_call(engine_address(inst), "POST", "/sim/fail_health").status_code \
                == 200
            t0 = time.monotonic()
            wait_until(lambda: r.hget(routes, "w1") is None, 10, interval=0.02,
                       what="route of the sick replica withdrawn")
            withdrawn_after = time.monotonic() - t0
            assert r.hget(routes, "w2")

            def restarted() -> bool:
                m = model_status(router, "m")
                assert m is not None
                again = [i for i in m["instances"] if i["worker_id"] == "w1"]
                return bool(again) and again[0]["state"] == "RUNNING" \
                    and again[0]["pid"] != inst["pid"]

            failed = wait_until(lambda: r.hget(instance, "error"), 15,
                                what="w1's instance FAILED")
            wait_until(restarted, 30, what="w1's replica restarted")
            wait_until(lambda: r.hget(routes, "w1"), 10, what="route back")
            sent = len(traffic.codes)
            wait_until(lambda: len(traffic.codes) >= sent + 5, 10, what="traffic after")
    finally:
        r.close()
    assert withdrawn_after < INTERVAL_S + 0.5, withdrawn_after
    assert "health check failed 3 times in a row" in failed
    bad = [c for c in traffic.codes if c != 200]
    assert not bad, f"{len(bad)} of {len(traffic.codes)} requests failed: {sorted(set(bad))}"
