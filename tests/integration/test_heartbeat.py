"""A real worker's heartbeats: while nothing it reports changes, a beat refreshes its alive
key alone (the record and its worker:revs count stay); a change (an engine started: its
load) is written at the next beat and moves the count."""

from __future__ import annotations

import redis

from shared.keys import Keys
from tests.support import Cluster, register, running_on, wait_until


def test_an_idle_worker_beats_without_rewriting_its_record(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1", HEARTBEAT_INTERVAL_S="0.2")
    router = cluster.router()
    k = Keys(cluster.prefix)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        def beat() -> float:
            value = r.get(k.worker_alive("w1"))
            return float(value) if value else 0.0

        # Registration, the first full beat, and whatever the worker reports once at start
        # (its weights scan): settled once the count holds over a few beats.
        seen: list[tuple[str | None, float]] = []

        def settled() -> bool:
            rev = r.hget(k.worker_revs, "w1")
            seen.append((None if rev is None else str(rev), beat()))
            return (len(seen) >= 4 and seen[-1][0] is not None
                    and len({rev for rev, _ in seen[-4:]}) == 1
                    and len({t for _, t in seen[-4:]}) == 4)

        wait_until(settled, 30, interval=0.25, what="the worker's record settles")
        rev, record = seen[-1][0], r.hgetall(k.worker("w1"))
        first = beat()
        wait_until(lambda: beat() > first + 0.5, 10, what="three more beats")
        assert r.hget(k.worker_revs, "w1") == rev
        assert r.hgetall(k.worker("w1")) == record
        # An engine starts: its load is reported at the next beat, with the count.
        assert register(router, "m", engine="sim").status_code == 201
        wait_until(lambda: running_on(router, "m") == ["w1"], 30, what="m runs on w1")
        wait_until(lambda: r.hget(k.worker_revs, "w1") != rev, 10, what="the count moves")
        assert r.hget(k.worker("w1"), "load") == '{"instances": 1.0}'
    finally:
        r.close()
