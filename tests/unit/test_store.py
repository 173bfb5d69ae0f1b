"""Store logic against fakeredis: conflicts, leases, fencing, manual holds."""

from __future__ import annotations

import uuid

import fakeredis
import pytest

from shared.errors import Conflict
from shared.keys import Keys
from shared.models import Assignment, Heartbeat, ModelSpec, WorkerRegistration
from shared.store import NotLeader, Store, connect


@pytest.fixture(params=["fakeredis", pytest.param("cluster", marks=pytest.mark.redis_cluster)])
async def store(request: pytest.FixtureRequest):
    """fakeredis, and a real 3-primary Redis Cluster: every operation keeps to one slot."""
    if request.param == "cluster":
        nodes = request.getfixturevalue("redis_cluster").addresses
        s = Store(connect("", cluster_nodes=nodes), Keys(f"t{uuid.uuid4().hex[:10]}"))
    else:
        s = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    yield s
    await s.close()


def spec(alias: str = "m", **kw) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


async def test_register_idempotent_and_conflict(store: Store) -> None:
    assert await store.register_model(spec()) is True
    assert await store.register_model(spec()) is False
    with pytest.raises(Conflict):
        await store.register_model(spec(max_model_len=1024))
    models = await store.list_models()
    assert [m.spec.alias for m in models] == ["m"]


async def test_delete_removes_assignments_and_routes(store: Store) -> None:
    await store.register_model(spec())
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    epoch = await store.acquire_lease("mgr", 5)
    await store.assign(f"mgr|{epoch}", Assignment(alias="m", worker_id="w1"))
    await store.set_route("m", "w1", "http://x:1")
    assert await store.delete_model("m") is True
    assert await store.worker_assignments("w1") == {}
    assert await store.all_routes(["m"]) == {"m": {}}
    assert await store.delete_model("m") is False


async def test_delete_leaves_no_records_or_requests(store: Store) -> None:
    """A FAILED record (even a dead worker's) and operators' requests go with the model: a
    re-registration starts clean."""
    await store.register_model(spec())
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    await store.put_instance("m", "w1", {"state": "FAILED", "error": "boom"})
    await store.request_manual_start("m", "w1")
    await store.request_sleep("m")
    assert await store.delete_model("m") is True
    assert await store.instances_of("m") == {}
    assert not await store.r.exists(store.k.instance("m", "w1"), store.k.instances("m"))
    assert await store.intents(["m"]) == {}


async def test_lease_is_exclusive_and_epochs_grow(store: Store) -> None:
    e1 = await store.acquire_lease("a", 5)
    assert e1 >= 1
    assert await store.acquire_lease("b", 5) == 0
    assert await store.acquire_lease("a", 5) == e1  # renewal keeps the epoch
    await store.release_lease(f"a|{e1}")
    e2 = await store.acquire_lease("b", 5)
    assert e2 > e1


async def test_stale_leader_cannot_write(store: Store) -> None:
    await store.register_model(spec())
    e1 = await store.acquire_lease("a", 5)
    await store.release_lease(f"a|{e1}")
    await store.acquire_lease("b", 5)
    with pytest.raises(NotLeader):
        await store.assign(f"a|{e1}", Assignment(alias="m", worker_id="w1"))
    assert await store.worker_assignments("w1") == {}


async def test_heartbeat_reports_expiry_and_unknown(store: Store) -> None:
    assert await store.heartbeat("w1", Heartbeat(), 5) is None
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    assert await store.heartbeat("w1", Heartbeat(), 5) is True
    await store.r.delete(store.k.worker_alive("w1"))
    assert await store.heartbeat("w1", Heartbeat(), 5) is False
    assert await store.alive(["w1", "w2"]) == {"w1"}


async def test_a_bare_heartbeat_refreshes_the_alive_key_alone(store: Store) -> None:
    """A beat that reports nothing new is one SET: the record and its count stay, and the
    alive key's value is the live worker's last_seen. One that reports writes the record and
    bumps the count; a bare beat of an unknown worker leaves nothing behind."""
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    assert await store.heartbeat("w1", Heartbeat(load={"instances": 1.0}), 5) is True
    assert await store.worker_revs() == {"w1": "2"}
    record = await store.r.hgetall(store.k.worker("w1"))
    assert record["load"] == '{"instances": 1.0}'
    assert await store.heartbeat("w1", Heartbeat(), 5) is True
    assert await store.r.hgetall(store.k.worker("w1")) == record
    assert await store.worker_revs() == {"w1": "2"}
    beat = float(str(await store.r.get(store.k.worker_alive("w1"))))
    assert beat >= float(record["last_seen"])
    [view] = await store.workers_by_id(["w1"])
    assert (view.alive, view.last_seen, view.load) == (True, beat, {"instances": 1.0})
    # A lapsed heartbeat is reported even by a bare beat, which then rewrites the record.
    await store.r.delete(store.k.worker_alive("w1"))
    assert await store.heartbeat("w1", Heartbeat(), 5) is False
    assert await store.worker_revs() == {"w1": "3"}
    assert await store.heartbeat("ghost", Heartbeat(), 5) is None
    assert not await store.r.exists(store.k.worker_alive("ghost"))
    # An alive key whose value is no time does not spoil the record.
    await store.r.set(store.k.worker_alive("w1"), "not a time")
    [view] = await store.workers_by_id(["w1"])
    assert view.alive and view.last_seen == float(
        str(await store.r.hget(store.k.worker("w1"), "last_seen")))


async def test_a_corrupt_revs_key_stops_no_heartbeat(store: Store) -> None:
    """``worker:revs`` of the wrong type: beats, registrations and the scheduler's read go
    on (the count is reported, read as empty: every record then counts as moved)."""
    await store.r.set(store.k.worker_revs, "garbage")
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    assert await store.heartbeat("w1", Heartbeat(load={"instances": 2.0}), 5) is True
    assert await store.r.hget(store.k.worker("w1"), "load") == '{"instances": 2.0}'
    assert await store.worker_revs() == {}
    assert await store.worker_ids() == ["w1"]


async def test_forgetting_a_dead_worker_drops_its_reported_load(store: Store) -> None:
    await store.register_model(spec())
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    epoch = await store.acquire_lease("a", 5)
    await store.assign(f"a|{epoch}", Assignment(alias="m", worker_id="w1"))
    await store.write_instance("m", "w1", {"state": "RUNNING"}, "http://x:1")
    await store.set_load("m", "w1", 2.0)
    await store.set_load("m", "w2", 1.0)
    await store.forget_dead_worker(f"a|{epoch}", "w1", ["m"])
    assert await store.r.hgetall(store.k.load("m")) == {"w2": "1"}
    assert await store.instances_of("m") == {}


async def test_manual_stop_holds_until_manual_start(store: Store) -> None:
    await store.register_model(spec())
    await store.request_manual_start("m", "w1")
    assert (await store.intents(["m"]))["m"].manual == {"w1"}
    await store.request_manual_stop("m", "w1")
    model = await store.get_model("m")
    assert model is not None and model.hold is not None
    assert await store.intents(["m"]) == {}
    await store.request_manual_start("m", "w1")
    model = await store.get_model("m")
    assert model is not None and model.hold is None


async def test_operator_requests_never_write_assignments(store: Store) -> None:
    """Only the scheduler writes assign:* (fenced); operators' actions are requests."""
    await store.register_model(spec())
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    epoch = await store.acquire_lease("mgr", 5)
    placed = Assignment(alias="m", worker_id="w1", epoch=epoch)
    await store.assign(f"mgr|{epoch}", placed)
    await store.request_manual_start("m", "w2")
    await store.request_sleep("m")
    await store.request_wake("m", 5)
    await store.request_manual_stop("m", "w2")
    await store.hold_model("m", "test")
    assert await store.worker_assignments("w1") == {"m": placed}
    assert await store.worker_assignments("w2") == {}


async def test_sleep_intent_cleared_only_if_unchanged(store: Store) -> None:
    await store.request_sleep("m")
    applied = (await store.intents(["m"]))["m"].sleep
    assert applied is not None
    await store.clear_intent("m", "something newer")
    assert (await store.intents(["m"]))["m"].sleep == applied
    await store.clear_intent("m", applied)
    assert await store.intents(["m"]) == {}


async def test_targets_of_reads_every_worker_and_skips_corrupt_entries(store: Store) -> None:
    for w in ("w1", "w2", "w3"):
        await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 5)
    epoch = await store.acquire_lease("mgr", 5)
    await store.assign(f"mgr|{epoch}", Assignment(alias="m", worker_id="w1", target="sleeping"))
    await store.r.hset(store.k.assign("w2"), "m", "garbage{")
    assert await store.targets_of("m") == {"w1": "sleeping"}


async def test_bulk_reads_answer_as_each_command_would(store: Store) -> None:
    """Store._reads (a script per 500 reads without a cluster, a pipeline on one) gives each
    reply in the shape of redis-py's own method, a wrong-type key as an error in its place,
    across chunk boundaries."""
    r = store.r
    await r.hset("t:rd:h", mapping={"a": "1", "b": "2"})
    await r.set("t:rd:s", "x")
    await r.sadd("t:rd:set", "m1", "m2")
    keys = ["t:rd:h", "t:rd:s", "t:rd:set", "t:rd:h", "t:rd:none", "t:rd:s", "t:rd:none",
            "t:rd:none", "t:rd:none"]
    ops = ("HGETALL", "GET", "SMEMBERS", "HKEYS", "GET", "HGETALL", "HGETALL", "SMEMBERS",
           "GET")
    got = await store._reads(keys * 300, ops)  # 2,700 reads: six script calls
    assert len(got) == len(keys) * 300
    for i in range(0, len(got), len(keys)):
        one = got[i:i + len(keys)]
        assert one[:5] == [{"a": "1", "b": "2"}, "x", {"m1", "m2"}, ["a", "b"], None]
        assert isinstance(one[5], Exception) and "WRONGTYPE" in str(one[5])
        assert one[6:] == [{}, set(), None]
    # Two ops cycle over the keys; a chunk boundary does not shift the cycle.
    pairs = await store._reads(["t:rd:h", "t:rd:s"] * 1200, ("HKEYS", "GET"))
    assert pairs == [["a", "b"], "x"] * 1200
    # Below the script's threshold: the same answers from a pipeline.
    small = await store._reads(keys, ops)
    assert small[:5] == got[:5] and small[6:] == got[6:len(keys)]
    assert isinstance(small[5], Exception)
    assert await store._reads([], ("GET",)) == []
    # A key the joined form cannot carry is read one command at a time, with the same answer.
    await r.set("t:rd:odd\nkey", "y")
    odd = await store._reads(["t:rd:odd\nkey"] + ["t:rd:s"] * 2100, ("GET",))
    assert odd == ["y"] + ["x"] * 2100


async def test_liveness_count_and_worker_listing_at_pool_scale(store: Store) -> None:
    """1,200 workers: the scheduler's probe counts live ones with commands packed once (from
    1,000 workers) and the listing reads records and liveness through the bulk reads' script
    (from 2,000 keys); both agree with the keys themselves."""
    ids = [f"pw{i:04d}" for i in range(1200)]
    async with store.r.pipeline(transaction=False) as pipe:
        for i, w in enumerate(ids):
            pipe.hset(store.k.worker(w), mapping={"url": f"http://{w}:7000", "engines": '["sim"]'})
            pipe.sadd(store.k.workers, w)
            if i % 3:
                pipe.set(store.k.worker_alive(w), "1")
        await pipe.execute()
    live = {w for i, w in enumerate(ids) if i % 3}
    probe = await store.scheduler_probe(ids)
    assert probe.alive == len(live) and probe.workers == len(ids)
    assert (await store.scheduler_probe(ids)).alive == len(live)  # the cached packed probe
    await store.r.delete(store.k.worker_alive(ids[1]))
    assert (await store.scheduler_probe(ids)).alive == len(live) - 1
    assert (await store.scheduler_probe(ids[:10])).alive == 5  # below the threshold: EXISTS
    views = {v.worker_id: v for v in await store.list_workers()}
    assert set(views) == set(ids)
    assert {w for w, v in views.items() if v.alive} == live - {ids[1]}
    assert views["pw0007"].url == "http://pw0007:7000" and views["pw0007"].engines == ["sim"]
