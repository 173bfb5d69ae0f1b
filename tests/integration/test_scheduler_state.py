"""The scheduler's own state against a real redis-server (the real ``Scheduler``, in process):
caches that must follow deletions, autoscale clocks that must survive a lease handover, and
records that do not parse, which must neither stop the pass nor stop what serves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from services.manager.scheduler import Scheduler
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec, WorkerRegistration
from shared.settings import ManagerSettings
from shared.store import Store, connect
from tests.support import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    s = Store(connect(redis_server.url), Keys(f"t{uuid.uuid4().hex[:10]}"), events=False)
    yield s
    await s.close()


def spec(alias: str, **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


def scheduler(store: Store, name: str = "mgr", scale_out_s: float = 5.0) -> Scheduler:
    settings = ManagerSettings(manager_id=name, lease_ttl_s=30, scale_out_s=scale_out_s)
    return Scheduler(store, settings, Nudger(store))


async def worker(store: Store, worker_id: str, engines: list[str]) -> None:
    await store.register_worker(WorkerRegistration(
        worker_id=worker_id, url=f"http://{worker_id}:1", engines=engines), 60)


async def test_reregistered_unplaceable_model_gets_its_reason_at_once(store: Store) -> None:
    """Held requests fail at once with the scheduler's reason; after a delete and a new
    registration the reason was never written again (the cache said it was), so they
    waited out cold_start_timeout_s (300 s by default) instead."""
    await worker(store, "w1", ["sim"])
    s = scheduler(store)
    await store.register_model(spec("big", engine="vllm"))  # no worker runs vllm
    await s.tick()
    first = await store.placement_reason("big")
    assert first and "vllm" in first
    assert await store.delete_model("big") is True
    assert await store.placement_reason("big") is None
    await store.register_model(spec("big", engine="vllm"))
    await s.tick()
    assert await store.placement_reason("big") == first


async def test_autoscale_clock_survives_a_lease_handover(store: Store) -> None:
    await worker(store, "w1", ["sim"])
    await worker(store, "w2", ["sim"])
    await store.register_model(spec("m", target_inflight=1, max_replicas=2))
    a = scheduler(store, "a", scale_out_s=3600)
    await a.tick()
    w = next(w for w, mine in (await store.assignments(["w1", "w2"])).items() if mine)
    await store.put_instance("m", w, {"state": "RUNNING", "inflight": "5"})
    await a.tick()  # the load is above target: the scale-out clock starts
    started = (await store.scale_marks())["m"].above_since
    assert started is not None
    await a.release()
    b = scheduler(store, "b", scale_out_s=3600)
    await b.tick()  # the new leader carries on from the same clock
    assert (await store.scale_marks())["m"].above_since == started
    # And once the load is gone the clock stops, for the next leader too.
    await store.put_instance("m", w, {"inflight": "0"})
    await b.tick()
    assert (await store.scale_marks())["m"].above_since is None
    # A deleted (or re-registered) model's clock goes with it.
    await store.delete_model("m")
    assert "m" not in await store.scale_marks()


async def test_bad_records_neither_stop_the_pass_nor_what_serves(store: Store) -> None:
    await worker(store, "w1", ["sim"])
    await worker(store, "w2", ["sim"])
    for alias in ("a", "victim"):
        await store.register_model(spec(alias))
    s = scheduler(store)
    await s.tick()
    placed = await store.assignments(["w1", "w2"])
    victim_on = next(w for w, mine in placed.items() if "victim" in mine)
    # A model spec, an instance count, a ledger entry, a ghost's assignment, a worker field.
    await store.r.hset(store.k.model("victim"), "spec", "garbage{")
    await store.put_instance("a", "w1", {"state": "RUNNING", "inflight": "abc"})
    await store.r.hset(store.k.ledger("w1"), "ghost", "garbage{")
    await store.r.hset(store.k.assign("w1"), "ghost", "garbage{")
    await store.r.set(store.k.routes_version, "abc")
    await store.register_model(spec("new"))
    await s.tick()  # raised on each of these before
    after = await store.assignments(["w1", "w2"])
    assert "victim" in after[victim_on]  # not taken for deleted: it keeps serving
    assert any("new" in mine for mine in after.values())
    assert any("a" in mine for mine in after.values())
    await store.r.hset(store.k.worker("w2"), "engines", "garbage{")
    await store.register_model(spec("newer"))
    await s.tick()
    assert "newer" in (await store.assignments(["w1"]))["w1"]
