"""Forgetting a dead worker under every alias (what a full pass does for each worker that
died since the last one), on a real Redis: everything of that worker goes under every
alias, in several scripts past 500 aliases; the other workers' entries stay; a key of the
wrong type is reported and skipped, not fatal; a manager without the lease changes nothing."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared.keys import Keys
from shared.models import Assignment, ModelSpec, WorkerRegistration
from shared.store import NotLeader, Store, connect
from tests.support import RedisServer

ALIASES = [f"m{i:04d}" for i in range(1_100)]  # three scripts' worth


async def _seed(store: Store) -> str:
    k = store.k
    await store.register_model(ModelSpec(alias=ALIASES[0], model_name="org/m", engine="sim"))
    for w in ("dead", "live"):
        await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 30)
    epoch = await store.acquire_lease("mgr", 30)
    token = f"mgr|{epoch}"
    await store.assign(token, Assignment(alias=ALIASES[0], worker_id="dead"))
    async with store.r.pipeline(transaction=False) as p:
        for a in ALIASES:
            p.hset(k.routes(a), mapping={"dead": "http://dead:1", "live": "http://live:1"})
            p.sadd(k.instances(a), "dead", "live")
            p.hset(k.instance(a, "dead"), "state", "RUNNING")
            p.hset(k.instance(a, "live"), "state", "RUNNING")
            p.hset(k.load(a), mapping={"dead": "1", "live": "2"})
        p.delete(k.routes(ALIASES[700]))
        p.set(k.routes(ALIASES[700]), "not a hash")  # poisoned, mid-way through the second
        await p.execute()
    return token


async def _run(url: str) -> None:
    store = Store(connect(url), Keys(f"fg-{uuid.uuid4().hex[:8]}"))
    k = store.k
    try:
        token = await _seed(store)
        with pytest.raises(NotLeader):
            await store.forget_dead_worker("mgr|999", "dead", ALIASES)
        assert await store.r.hget(k.routes(ALIASES[0]), "dead") == "http://dead:1"
        assert await store.r.hexists(k.assign("dead"), ALIASES[0])

        since = 0.0
        await store.forget_dead_worker(token, "dead", ALIASES)
        async with store.r.pipeline(transaction=False) as p:
            for a in ALIASES:
                if a != ALIASES[700]:
                    p.hkeys(k.routes(a))
                p.smembers(k.instances(a))
                p.exists(k.instance(a, "dead"), k.instance(a, "live"))
                p.hkeys(k.load(a))
            replies = await p.execute()
        i = 0
        for a in ALIASES:
            if a != ALIASES[700]:
                assert replies[i] == ["live"], a
                i += 1
            assert replies[i] == {"live"}, a
            assert replies[i + 1] == 1, a  # the live worker's record alone
            assert replies[i + 2] == ["live"], a
            i += 3
        assert await store.r.get(k.routes(ALIASES[700])) == "not a hash"
        assert any(p["key"] == k.routes(ALIASES[700]) for p in store.problems.since(since))
        assert not await store.r.exists(k.assign("dead"))
    finally:
        await store.close()


def test_a_dead_worker_is_forgotten_under_every_alias(redis_server: RedisServer) -> None:
    asyncio.run(_run(redis_server.url))
