"""Heartbeats paced to the pool's size (shared/pace.py), with real services: past
HEARTBEAT_MAX_PER_S x HEARTBEAT_INTERVAL_S workers a worker beats less often with a longer
TTL, written by itself (straight to Redis) or by the manager (MANAGER_URL), and the manager,
pacing its own waits the same way, keeps the worker alive and its model where it is."""

from __future__ import annotations

import itertools
import time

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.support import Cluster, register, running_on, status, wait_until

# FAST_ENV beats every 0.3 s with a 1.5 s TTL; at 1 beat a second at most, a pool of one
# worker is paced 1 / (1 x 0.3) = 3.33x: a beat every 1 s, a TTL of 5 s.
PACED = {"HEARTBEAT_MAX_PER_S": "1", "INTERNAL_TOKEN": "inside"}


@pytest.mark.parametrize("via", ["redis", "manager"])
def test_a_worker_paces_its_beats_to_the_pool_and_stays_alive(cluster: Cluster,
                                                              via: str) -> None:
    cluster.extra_env.update(PACED)
    mgr = cluster.manager()
    cluster.worker("w1", **({"MANAGER_URL": mgr.url} if via == "manager" else {}))
    router = cluster.router()
    k = Keys(cluster.prefix)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        # Paced once the worker (or the manager, which recounts every 5 s) counts the pool.
        wait_until(lambda: (r.pttl(k.worker_alive("w1")) or 0) > 2_500, 20,
                   what="a TTL longer than the unpaced 1.5 s")
        assert register(router, "m", engine="sim").status_code == 201
        wait_until(lambda: running_on(router, "m") == ["w1"], 30, what="m runs on w1")
        # Beats about a second apart (unpaced: 0.3 s), and never a lapse meanwhile.
        beats: list[float] = []
        until = time.monotonic() + 4.5
        while time.monotonic() < until:
            value = r.get(k.worker_alive("w1"))
            assert value is not None, "the worker's heartbeat key lapsed"
            if not beats or float(value) != beats[-1]:
                beats.append(float(value))
            time.sleep(0.05)
        gaps = [b - a for a, b in itertools.pairwise(beats[1:])]
        assert gaps and min(gaps) > 0.7, gaps
        assert r.pttl(k.worker_alive("w1")) > 1_500  # still paced
        # The manager's waits are paced too: the worker is alive and keeps its model.
        workers = {w["worker_id"]: w for w in status(router)["workers"]}
        assert workers["w1"]["alive"] is True
        assert running_on(router, "m") == ["w1"]
        # The manager's own waits are paced alike, and /health says by how much.
        assert abs(httpx.get(f"{mgr.url}/health").json()["heartbeat_pace"] - 1 / 0.3) < 0.01
        if via == "manager":
            hb = httpx.post(f"{mgr.url}/workers/w1/heartbeat", json={},
                            headers={"authorization": "Bearer inside"})
            assert hb.status_code == 200
            assert abs(hb.json()["pace"] - 1 / 0.3) < 0.01
    finally:
        r.close()
