"""The pool on a real 3-primary Redis Cluster: the store's operations (a CROSSSLOT anywhere
fails them: redis-py's cluster client refuses a transaction, a script or an MGET over several
slots), pub/sub hints, and a request served through router, manager and worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared.apikeys import KeyRecord, hash_secret
from shared.errors import Conflict
from shared.keys import Keys
from shared.models import (
    AdapterSpec,
    Assignment,
    Heartbeat,
    ModelSpec,
    WorkerRegistration,
)
from shared.store import FlushBatch, NotLeader, ScaleMark, Store, connect
from shared.store.scheduling import Unassign
from tests.integration.keys_support import admin, answers, create_key, serving
from tests.integration.keys_support import chat as chat_as
from tests.integration.keys_support import pool as keys_pool
from tests.redis_cluster import RedisCluster
from tests.support import (
    Cluster,
    chat,
    model_status,
    register,
    running_on,
    wait_serving,
    wait_until,
)

pytestmark = pytest.mark.redis_cluster


def spec(alias: str, **kw: Any) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


@pytest.fixture
async def store(redis_cluster: RedisCluster) -> AsyncIterator[Store]:
    s = Store(connect("", cluster_nodes=redis_cluster.addresses),
              Keys(f"t{uuid.uuid4().hex[:10]}"))
    yield s
    await s.close()


def keys_by_node(servers: RedisCluster, prefix: str) -> dict[int, set[str]]:
    out = {}
    for port in servers.ports:
        with redis.Redis(port=port, decode_responses=True) as r:
            out[port] = set(r.scan_iter(f"{prefix}:*"))
    return out


async def _lease(store: Store) -> str:
    epoch = await store.acquire_lease("mgr", 30)
    assert epoch > 0
    return f"mgr|{epoch}"


async def test_models_workers_and_assignments(store: Store, redis_cluster: RedisCluster
                                              ) -> None:
    aliases = [f"m{i}" for i in range(12)]
    for a in aliases:
        assert await store.register_model(spec(a)) is True
    assert await store.register_model(spec("m0")) is False
    for w in ("w1", "w2"):
        assert await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 30)
        assert await store.heartbeat(w, Heartbeat(gpus=[], gpu_message="", load={"x": 1.0}), 30)
    # Another URL may not take a live worker's id.
    assert not await store.register_worker(WorkerRegistration(worker_id="w1", url="http://o:1"), 30)
    assert await store.worker_ids() == ["w1", "w2"]
    assert await store.alive(["w1", "w2", "w3"]) == {"w1", "w2"}
    assert {w.worker_id for w in await store.list_workers()} == {"w1", "w2"}
    await store.set_engine_flags("w1", "0.9.0", ["--max-num-seqs"])
    assert [f.worker_id for f in await store.live_vllm_flags()] == ["w1"]

    token = await _lease(store)
    await store.write_fenced(token, [
        Assignment(alias="m1", worker_id="w1", gpus=[0], mb_per_gpu=100),
        Assignment(alias="m2", worker_id="w2"), Unassign("w2", "m3")])
    await store.assign(token, Assignment(alias="m3", worker_id="w1"))
    await store.set_placement_reason("m4", "no room")
    await store.assign(token, Assignment(alias="m4", worker_id="w2"))
    assert await store.placement_reason("m4") is None  # cleared after the fenced write
    assigned = await store.assignments(["w1", "w2"])
    assert set(assigned["w1"]) == {"m1", "m3"} and set(assigned["w2"]) == {"m2", "m4"}
    assert (await store.worker_state("w1"))[1] == {"m1"}
    assert await store.targets_of("m1") == {"w1": "running"}
    assert await store.release_reservation("w1", "m1") is False  # still assigned
    await store.unassign(token, "w1", "m1")
    assert await store.release_reservation("w1", "m1") is True
    await store.save_scale_marks(token, {"m2": ScaleMark(version="v", above_since=1.0)}, [])
    assert (await store.scale_marks())["m2"].above_since == 1.0
    with pytest.raises(NotLeader):
        await store.assign("mgr|999", Assignment(alias="m5", worker_id="w1"))

    # The keys spread over the nodes: models and workers are tagged apart.
    spread = keys_by_node(redis_cluster, store.k.prefix)
    assert sum(1 for keys in spread.values() if keys) >= 2, spread

    assert await store.delete_model("m2") is True
    assert "m2" not in (await store.assignments(["w2"]))["w2"]
    assert "m2" not in await store.scale_marks()
    assert await store.delete_model("m2") is False
    assert {m.spec.alias for m in await store.list_models()} == set(aliases) - {"m2"}


async def test_observed_state_routes_and_requests(store: Store) -> None:
    for a in ("a", "b"):
        await store.register_model(spec(a))
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://w1:1"), 30)
    start = await store.route_changes(None, 100, None)
    await store.write_instance("a", "w1", {"state": "RUNNING"}, "http://w1:1")
    await store.set_route("b", "w1", "http://w1:1")
    await store.set_load("a", "w1", 3)
    changes = await store.route_changes(start.last_id, 100, start.models_last_id, ["w1", "w9"])
    assert changes.aliases == ["a", "b"] and changes.alive == {"w1"}
    assert int(changes.versions[1]) == int(start.versions[1]) + 2
    assert await store.all_routes(["a", "b"]) == {"a": {"w1": "http://w1:1"},
                                                  "b": {"w1": "http://w1:1"}}
    assert await store.loads(["a"]) == {"a": {"w1": 3.0}}
    assert set((await store.instances_by_alias(["a", "b"]))["a"]) == {"w1"}
    await store.delete_instance("a", "w1")
    assert await store.instances_of("a") == {}

    await store.want("a", 10)
    assert await store.demands(["a", "b"]) == {"a"}
    assert await store.enter_queue("a", "r:1", 10, 1) is True
    assert await store.enter_queue("a", "r:2", 10, 1) is False
    await store.record_duration("a", "cold_start", 2.0)
    await store.record_wait("a", 0.5)
    views = dict((m.spec.alias, d) for m, d in await store.model_views())
    assert views["a"].waiting_requests == 1 and views["a"].stats["cold_starts"] == 1
    assert (await store.model_details(["b"]))["b"].instances == {}
    await store.check_records(["w1"])
    assert store.problems.since(0) == []

    await store.request_manual_start("a", "w1")
    await store.request_sleep("b")
    intents = await store.intents(["a", "b"])
    assert intents["a"].manual == {"w1"} and intents["b"].sleep
    await store.clear_intent("b", intents["b"].sleep or "")
    await store.request_manual_stop("a", "w1")
    assert (await store.get_model("a")).hold is not None  # type: ignore[union-attr]
    await store.request_wake("a", 10)
    await store.hold_model("b", "stopped")
    held = await store.get_models(["a", "b"])
    assert held["a"].hold is None and held["b"].hold is not None
    assert int((await store.versions())[0]) >= 6  # 2 registrations + 4 logged requests


async def test_dead_workers_are_forgotten_then_removed(store: Store) -> None:
    await store.register_model(spec("a"))
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://w1:1"), 30)
    token = await _lease(store)
    await store.assign(token, Assignment(alias="a", worker_id="w1", gpus=[0], mb_per_gpu=1))
    await store.write_instance("a", "w1", {"state": "RUNNING"}, "http://w1:1")
    await store.set_load("a", "w1", 3.0)
    before = await store.versions()
    assert await store.remove_dead_worker(token, "w1") is False  # alive
    await store.unregister_worker_alive("w1")
    assert await store.remove_dead_worker(token, "w1") is False  # still assigned
    with pytest.raises(NotLeader):
        await store.forget_dead_worker("mgr|999", "w1", ["a"])
    await store.forget_dead_worker(token, "w1", ["a"])
    assert await store.worker_assignments("w1") == {}
    assert await store.all_routes(["a"]) == {"a": {}}
    assert await store.instances_of("a") == {}
    assert not await store.r.hexists(store.k.load("a"), "w1")
    assert (await store.versions())[1] != before[1]
    assert await store.remove_dead_worker(token, "w1") is True
    assert await store.worker_ids() == []
    assert await store.heartbeat("w1", Heartbeat(), 30) is None  # must register again
    assert await store.ledgers(["w1"]) == {"w1": {}}


async def test_hints_reach_a_subscriber(store: Store, redis_cluster: RedisCluster) -> None:
    """Hints published on any node (by scripts, in and after transactions) are heard."""
    listener = Store(connect("", cluster_nodes=redis_cluster.addresses), store.k)
    got: list[dict[str, Any]] = []
    task = asyncio.create_task(listener.listen(got.append))
    try:
        await asyncio.sleep(0.3)  # subscribed
        await store.register_model(spec("a"))  # published by a script in the {s} slot
        await store.register_worker(WorkerRegistration(worker_id="w1", url="http://w1:1"), 30)
        token = await _lease(store)
        await store.write_fenced(token, [Assignment(alias="a", worker_id="w1")])
        await store.write_instance("a", "w1", {"state": "RUNNING"}, "http://w1:1")

        async def heard() -> None:
            while {h.get("kind") for h in got} < {"model", "worker", "assign", "route"}:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(heard(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await listener.close()


def _key(key_id: str, tenant: str, secret: str, **kw: Any) -> KeyRecord:
    return KeyRecord(key_id=key_id, name=key_id, tenant=tenant,
                     secret_hash=hash_secret(secret.encode()), models=["*"], **kw)


async def test_api_keys_limits_and_usage(store: Store, redis_cluster: RedisCluster) -> None:
    """Keys of two tenants (two slots) and the index ({s}): create, list, rotate, revoke;
    a limiter decision per tenant in one pipeline, also after the scripts were flushed."""
    a, b = _key("ka", "acme", "s1", rpm=60), _key("kb", "beta", "s2")
    await store.save_key(a)
    await store.save_key(b)
    await store.set_tenant_limits("acme", {"rpm": 120, "tpm": None})
    keys, limits, tenants = await store.all_keys()
    assert {k.key_id for k in keys} == {"ka", "kb"} and tenants == 2
    assert limits == {"acme": {"rpm": 120}}
    assert await store.keys_version() == 3
    assert await store.check_in("r1") == (3, 1)
    def rotate(rec: KeyRecord) -> None:
        rec.secret_hash = hash_secret(b"s3")

    rotated = await store.update_key("acme", "ka", rotate)
    assert rotated is not None and rotated.rpm == 60
    got = await store.get_key("ka")
    assert got is not None and got.secret_hash == hash_secret(b"s3")

    ka, tenant = store.k.rate("acme", "ka", "req"), store.k.rate("acme", "tenant", "req")
    kb = store.k.rate("beta", "kb", "tok")
    one = await store.limit([ka, tenant], [1e6, 0, 1, 5e5, 0, 1])
    assert one.admitted and len(one.ahead_us) == 2
    assert not (await store.limit([ka, tenant], [1e6, 0, 1, 5e5, 0, 1])).admitted
    for port in redis_cluster.ports:  # a cluster that lost its scripts: loaded again
        with redis.Redis(port=port) as r:
            r.script_flush()
    both = await store.limit_many([([ka], [1e6, 0, 1]), ([kb], [1e3, 1e6, 10])])
    assert [d.admitted for d in both] == [False, True]
    # Numbered per tenant: each tenant's first batch is 1.
    batches = [FlushBatch("acme", 1, {}, {0: {"ka|m|requests": 2}}),
               FlushBatch("beta", 1, {kb: 5e3}, {0: {"kb|m|requests": 1}})]
    assert await store.flush("writer", batches) == [True, True]
    assert await store.flush("writer", batches) == [True, True]  # a resend: applied once
    rows = await store.usage_rows(["acme", "beta"], [0])
    assert [r[2] for r in rows] == [{"ka|m|requests": "2"}, {"kb|m|requests": "1"}]

    assert await store.delete_key(rotated) is True
    assert await store.get_key("ka") is None
    assert await store.delete_key(rotated) is False
    assert await store.update_key("acme", "ka", rotate) is None  # revoked: not brought back
    assert [k.key_id for k in (await store.all_keys())[0]] == ["kb"]
    assert await store.keys_version() == 6


async def test_adapters_prefetch_and_model_delete(store: Store) -> None:
    """Adapters ({s}) of a model; prefetch requests ({s}) and progress (the model's slot);
    deleting the model removes its loaded adapters, progress and requests."""
    await store.register_model(spec("base"))
    for w in ("w1", "w2"):
        await store.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 30)
    lora = AdapterSpec(alias="lo", base="base", adapter="org/lo")
    assert await store.register_adapter(lora) == "created"
    assert await store.register_adapter(lora) == "same"
    assert await store.register_adapter(AdapterSpec(alias="x", base="nope", adapter="o/x")
                                        ) == "no_base"
    with pytest.raises(Conflict):
        await store.register_adapter(AdapterSpec(alias="base", base="base", adapter="o/x"))
    await store.set_lora_loaded("base", "w1", ["lo"])
    await store.record_adapter_load("lo", 1.5)
    assert (await store.adapter_stats())["lo"] == {"loads": 1.0, "load_s": 1.5}
    assert await store.delete_adapter("lo") is True
    assert await store.list_adapters() == {} and await store.adapter_stats() == {}
    assert await store.register_adapter(lora) == "created"

    await store.request_prefetch("base", "org/m", ["w1", "w2"])
    assert await store.prefetch_requests("w2") == {"base": "org/m"}
    status = (await store.prefetch_status(["base"]))["base"]
    assert {w: s["state"] for w, s in status.items()} == {"w1": "queued", "w2": "queued"}
    await store.set_prefetch_status("base", "w1", {"state": "done"}, finished=True)
    assert await store.prefetch_requests("w1") == {}
    assert (await store.prefetch_status(["base"]))["base"]["w1"]["state"] == "done"

    assert await store.delete_model("base") is True
    assert await store.lora_loaded(["base"]) == {"base": {}}
    assert await store.prefetch_status(["base"]) == {}
    assert await store.prefetch_requests("w2") == {}


@pytest.fixture
def pool_on_cluster(redis_cluster: RedisCluster, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster("redis://127.0.0.1:1/0", f"t{uuid.uuid4().hex[:10]}", tmp_path,
                extra_env={"REDIS_CLUSTER_NODES": redis_cluster.addresses})
    yield c
    c.stop_all()


def test_served_through_router_manager_and_worker(pool_on_cluster: Cluster,
                                                  redis_cluster: RedisCluster) -> None:
    """REDIS_URL points nowhere: everything goes through the cluster."""
    c = pool_on_cluster
    c.manager()
    c.worker("w1")
    router = c.router()
    assert register(router, "demo", engine="sim").status_code == 201
    wait_serving(router, "demo")
    r = chat(router, "demo")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert running_on(router, "demo") == ["w1"]
    stored = set().union(*keys_by_node(redis_cluster, c.prefix).values())
    assert f"{c.prefix}:{{m:demo}}:routes" in stored
    # A delete reaches the routers (its log entry) and the worker.
    assert httpx.delete(f"{router.url}/admin/models/demo", timeout=10).status_code == 200
    wait_until(lambda: chat(router, "demo").status_code == 404, 15, what="demo gone")
    assert model_status(router, "demo") is None


def test_keys_and_limits_through_routers(pool_on_cluster: Cluster) -> None:
    """API keys made, rotated and revoked through the admin API, and a limit shared by two
    routers, with every key in the cluster."""
    routers = keys_pool(pool_on_cluster, 2)
    serving(routers, "m1")
    made = create_key(routers[0], name="bob", rpm=2)  # a burst of one request
    # Until a router's key ring has the first key it serves open (AUTH_MODE=auto), so the
    # request below would pass unlimited: wait until both refuse a request without a key.
    for r in routers:
        wait_until(partial(answers, r, "m1", None, 401), 5, what=f"keys required on {r.name}")
    wait_until(partial(answers, routers[1], "m1", made["key"], 200), 5, what="key known")
    assert chat_as(routers[0], "m1", made["key"]).status_code == 429  # the same bucket
    rotated = admin(routers[1], "POST", f"/keys/{made['key_id']}/rotate").json()["key"]
    wait_until(partial(answers, routers[0], "m1", made["key"], 401), 5, what="old key refused")
    assert admin(routers[0], "DELETE", f"/keys/{made['key_id']}").status_code == 200
    wait_until(partial(answers, routers[1], "m1", rotated, 401), 5, what="revoked key refused")
    assert admin(routers[1], "GET", f"/keys/{made['key_id']}").status_code == 404
