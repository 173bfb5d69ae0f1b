"""Limits with Redis gone (LIMITS_ON_REDIS_DOWN allow/deny), and the Redis cost of an
admitted request counted on a redis-server of the test's own."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.keys_support import ADMIN, chat, create_key, known, pool, serving
from tests.support import Cluster, RedisServer, free_port, register


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis").start()
    yield server
    server.stop()


def evalsha_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_limits_while_redis_is_down(own_redis: RedisServer, tmp_path: Path,
                                    policy: str) -> None:
    cluster = Cluster(own_redis.url, "down", tmp_path)
    try:
        # Flushes (their own EVALSHA each) wait past the window counted below.
        routers = pool(cluster, 2, LIMITS_ON_REDIS_DOWN=policy, LIMITS_FLUSH_S="60")
        serving(routers, "m1")
        key = create_key(routers[0], rpm=120)["key"]  # burst 2, one per 0.5 s
        known(routers, key)
        r = redis.Redis.from_url(own_redis.url, decode_responses=True)
        # Redis's cost: one EVALSHA per request, nothing else on the request's path.
        before = evalsha_calls(r)
        codes = []
        for _ in range(6):
            codes.append(chat(routers[0], "m1", key).status_code)
            time.sleep(0.55)
        assert codes == [200] * 6
        assert evalsha_calls(r) - before == 6

        own_redis.stop()
        began = time.monotonic()
        got = [chat(routers[0], "m1", key) for _ in range(6)]
        elapsed = time.monotonic() - began
        codes = [g.status_code for g in got]
        if policy == "deny":
            assert codes == [503] * 6
            assert got[0].json()["error"]["code"] == "store_unavailable"
        else:
            # A local share of the limit: half the rate (two routers seen: one a second
            # here) with the same tolerance (0.5 s): one now, one more after 0.5 s, then one
            # a second; not the six the shared limit would have let through by now.
            admitted = codes.count(200)
            assert 1 <= admitted <= 2 + int(elapsed), (codes, elapsed)
            assert codes.count(429) == 6 - admitted
        # Authentication needs no Redis: a wrong key is still a 401.
        assert chat(routers[1], "m1", "sk-svllm-wrong").status_code == 401
    finally:
        cluster.stop_all()


def test_a_held_stream_that_loses_redis_ends_with_an_error_and_frees_its_slot(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """A streamed request held for a cold start whose wait fails (Redis gone for as long as
    the demand lives, 10 s: a blip is waited out) ends with an error event, not a cut
    connection, and gives its key's concurrency slot back."""
    cluster = Cluster(own_redis.url, "held", tmp_path)
    try:
        routers = pool(cluster, 1, HOLD_KEEPALIVE_S="0.2", LIMITS_ON_REDIS_DOWN="allow")
        router = routers[0]
        assert register(router, "cold", token=ADMIN, engine="sim", min_replicas=0,
                        extra_args=["--startup-delay", "60"],
                        cold_start_timeout_s=120).status_code == 201
        key = create_key(router, max_concurrent=1)["key"]
        known(routers, key)
        body = {"model": "cold", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}
        lines: list[str] = []
        up, stopped = True, 0.0
        with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {key}"}, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                lines.append(line)
                if line.startswith(":") and up:
                    own_redis.stop()  # held: the wait's refreshes now fail
                    up, stopped = False, time.monotonic()
        waited = time.monotonic() - stopped
        events = [x for x in lines if x.startswith("data: ")]
        assert events, lines
        assert waited >= 9, waited
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "store_unavailable", error
        # The slot came back: the next request is refused for Redis, not for concurrency.
        again = chat(router, "cold", key)
        assert again.status_code == 503, again.text
        assert again.json()["error"]["code"] == "store_unavailable"
    finally:
        cluster.stop_all()
