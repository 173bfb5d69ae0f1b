"""Poison-tolerant reads against a real redis-server: each kind of corrupt record is skipped
and reported (key, field, reason) while every other record still reads; multi-key writes
either land whole or not at all; a corrupt version counter is repaired by the next change."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from shared.errors import StoreCorrupt
from shared.keys import Keys
from shared.models import Assignment, ModelSpec, WorkerRegistration
from shared.records import BadRecord, Problems
from shared.store import Store, connect
from tests.support import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    s = Store(connect(redis_server.url), Keys(f"t{uuid.uuid4().hex[:10]}"))
    yield s
    await s.close()


def spec(alias: str, **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


def problems(store: Store, since: float) -> set[tuple[str, str | None]]:
    return {(str(p["key"]), p["field"]) for p in store.problems.since(since)}


async def test_bad_model_spec_is_skipped_and_named(store: Store) -> None:
    for alias in ("a", "victim"):
        await store.register_model(spec(alias))
    t0 = time.monotonic()
    await store.r.hset(store.k.model("victim"), "spec", "garbage{")
    listed, unreadable = await store.list_models_checked()
    assert [m.spec.alias for m in listed] == ["a"]
    assert unreadable == {"victim"}
    assert problems(store, t0) == {(store.k.model("victim"), "spec")}
    assert await store.get_model("victim") is None
    # A new registration works and is visible (it answered 500 and was never seen before).
    assert await store.register_model(spec("b")) is True
    assert sorted(m.spec.alias for m in await store.list_models()) == ["a", "b"]
    # A spec for another alias is as bad as garbage.
    await store.r.hset(store.k.model("a"), "spec", spec("b").model_dump_json())
    assert [m.spec.alias for m in await store.list_models()] == ["b"]
    # The operator's fix: deleting the bad record works.
    assert await store.delete_model("victim") is True
    assert await store.r.exists(store.k.model("victim")) == 0


async def test_bad_worker_fields_skip_only_that_worker(store: Store) -> None:
    for w in ("w1", "w2", "w3"):
        await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1",
                                                       engines=["sim"]), 60)
    t0 = time.monotonic()
    await store.r.hset(store.k.worker("w2"), "engines", "garbage{")
    await store.r.hset(store.k.worker("w3"), "gpus", '[{"index": "not a number"}]')
    assert [w.worker_id for w in await store.list_workers()] == ["w1"]
    found = problems(store, t0)
    assert (store.k.worker("w2"), "engines") in found
    assert {k for k, _ in found} == {store.k.worker("w2"), store.k.worker("w3")}
    assert await store.worker_ids() == ["w1", "w2", "w3"]


async def test_a_write_count_that_is_not_a_number_is_reported_not_fatal(
        store: Store) -> None:
    # Redis refuses HINCRBY on it ("value is not an integer", the "ERR " code dropped by
    # redis-py): a refusal about the data, so the worker's writes go on.
    reg = WorkerRegistration(worker_id="w1", url="http://w1:1", engines=["sim"])
    await store.register_worker(reg, 60)
    t0 = time.monotonic()
    await store.r.hset(store.k.worker_revs, "w1", "many")
    await store.register_worker(reg, 60)
    assert (store.k.worker_revs, None) in problems(store, t0)
    assert [w.worker_id for w in await store.list_workers()] == ["w1"]


async def test_bad_assignment_and_ledger_entries_are_skipped(store: Store) -> None:
    epoch = await store.acquire_lease("mgr", 30)
    await store.assign(f"mgr|{epoch}", Assignment(alias="a", worker_id="w1", gpus=[0],
                                                   mb_per_gpu=100))
    t0 = time.monotonic()
    await store.r.hset(store.k.assign("w1"), "ghost", "garbage{")
    await store.r.hset(store.k.assign("w1"), "other", Assignment(
        alias="other", worker_id="w9").model_dump_json())  # names another worker
    await store.r.hset(store.k.ledger("w1"), "ghost", '{"alias": "ghost"}')
    assert list((await store.assignments(["w1"]))["w1"]) == ["a"]
    assigned, reserved = await store.worker_state("w1")
    assert list(assigned) == ["a"] and reserved == {"a", "ghost"}
    assert list((await store.ledgers(["w1"]))["w1"]) == ["a"]
    assert problems(store, t0) == {(store.k.assign("w1"), "ghost"),
                                   (store.k.assign("w1"), "other"),
                                   (store.k.ledger("w1"), "ghost")}
    # A whole hash of the wrong type reads as empty, reported.
    await store.r.delete(store.k.assign("w2"))
    await store.r.set(store.k.assign("w2"), "not a hash")
    assert (await store.assignments(["w1", "w2"]))["w2"] == {}
    assert (store.k.assign("w2"), None) in problems(store, t0)


async def test_bad_instance_numbers_are_skipped(store: Store) -> None:
    good = {"state": "RUNNING", "inflight": "2", "port": "8001", "updated_at": "1.5"}
    await store.put_instance("a", "w1", good)
    await store.put_instance("b", "w1", good | {"inflight": "abc"})
    await store.put_instance("c", "w1", good | {"state": "DANCING"})
    t0 = time.monotonic()
    by_alias = await store.instances_by_alias(["a", "b", "c"])
    assert by_alias == {"a": {"w1": good}, "b": {}, "c": {}}
    assert await store.instances_of("b") == {}
    assert problems(store, t0) == {(store.k.instance("b", "w1"), "inflight"),
                                   (store.k.instance("c", "w1"), "state")}


async def test_corrupt_version_counters_are_repaired_by_the_next_change(store: Store) -> None:
    await store.set_route("a", "w1", "http://w1:1")
    await store.r.set(store.k.routes_version, "abc")
    before = await store.route_changes(None, 10)
    # Every route change failed with "value is not an integer" (reported as Redis down).
    await store.set_route("a", "w2", "http://w2:1")
    after = await store.route_changes(None, 10)
    assert int(after.versions[1]) > 1_000_000  # restarted from Redis's clock: it moved
    assert after.versions != before.versions
    await store.set_route("a", "w3", "http://w3:1")
    assert int((await store.versions())[1]) == int(after.versions[1]) + 1
    assert (await store.all_routes(["a"]))["a"] == {"w1": "http://w1:1", "w2": "http://w2:1",
                                                     "w3": "http://w3:1"}
    # The models counter, and a log or counter of the wrong type, likewise.
    await store.r.set(store.k.models_version, "1.5")
    await store.r.delete(store.k.models_log)
    await store.r.set(store.k.models_log, "not a stream")
    await store.r.delete(store.k.routes_version)
    await store.r.hset(store.k.routes_version, "x", "1")
    assert await store.register_model(spec("m")) is True
    await store.set_route("m", "w1", "http://w1:1")
    m, r = await store.versions()
    assert int(m) > 1_000_000 and int(r) == 1
    assert (await store.route_changes(None, 10, None)).models_last_id != "0-0"


async def test_status_check_names_a_corrupt_counter(store: Store) -> None:
    await store.r.set(store.k.routes_version, "abc")
    t0 = time.monotonic()
    await store.check_records([])
    assert problems(store, t0) == {(store.k.routes_version, None)}


async def test_register_with_a_wrong_typed_key_writes_nothing(store: Store) -> None:
    await store.r.set(store.k.models, "not a set")
    with pytest.raises(StoreCorrupt, match="models"):
        await store.register_model(spec("a"))
    # Before: the model hash landed (first command of the transaction), the set add failed.
    assert await store.r.exists(store.k.model("a")) == 0
    assert await store.r.get(store.k.models_version) is None
    await store.r.delete(store.k.models)
    await store.r.set(store.k.model("b"), "not a hash")
    with pytest.raises(StoreCorrupt):
        await store.register_model(spec("b"))
    assert await store.r.exists(store.k.models) == 0


async def test_delete_survives_a_wrong_typed_assign_hash(store: Store) -> None:
    await store.register_model(spec("a"))
    for w in ("w1", "w2"):
        await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 60)
    epoch = await store.acquire_lease("mgr", 30)
    await store.assign(f"mgr|{epoch}", Assignment(alias="a", worker_id="w1"))
    await store.r.set(store.k.assign("w2"), "not a hash")
    assert await store.delete_model("a") is True
    assert await store.r.hexists(store.k.assign("w1"), "a") == 0
    assert await store.list_models() == []


async def test_admin_details_tolerate_bad_stats_and_queues(store: Store) -> None:
    for alias in ("a", "b"):
        await store.register_model(spec(alias))
    await store.record_duration("a", "cold_start", 2.0)
    await store.record_duration("b", "cold_start", 3.0)
    await store.set_placement_reason("a", "no room")
    await store.put_instance("a", "w1", {"state": "RUNNING"})
    t0 = time.monotonic()
    await store.r.hset(store.k.stats("b"), "cold_starts", "many")
    await store.r.lpush(store.k.samples("b", "wake"), "soon")
    await store.r.set(store.k.queue("b"), "not a sorted set")
    details = await store.model_details(["a", "b"])
    assert details["a"].placement == "no room"
    assert details["a"].instances == {"w1": {"state": "RUNNING"}}
    assert details["a"].stats == await store.timings("a")
    assert details["a"].stats["median_cold_start_s"] == 2.0
    assert details["b"].waiting_requests == 0
    assert details["b"].stats["cold_starts"] == 0
    assert {k for k, _ in problems(store, t0)} == {
        store.k.stats("b"), store.k.samples("b", "wake"), store.k.queue("b")}


def test_problems_are_logged_once_per_key_and_listed_by_time(
        caplog: pytest.LogCaptureFixture) -> None:
    log = Problems(log_every_s=60)
    caplog.set_level(logging.WARNING, logger="shared.records")
    t0 = time.monotonic()
    for _ in range(50):
        log.report(BadRecord("k1", "bad", "f"))
    log.report(BadRecord("k2", "worse"))
    assert len(caplog.records) == 2
    assert log.since(t0) == [{"key": "k1", "field": "f", "reason": "bad"},
                             {"key": "k2", "field": None, "reason": "worse"}]
    assert log.since(time.monotonic() + 1) == []
