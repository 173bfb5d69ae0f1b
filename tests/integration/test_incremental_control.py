"""The incremental control plane (issue 15): between full passes the scheduler acts on what
changed and a worker re-reads its assignments only when they changed; the periodic full
resync repairs what nothing announced. The real ``Scheduler`` and the worker's
``AssignmentReader`` in process against a real redis-server and a local Redis Cluster, then
the real services with their timers set out of reach."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis

from services.manager.scheduler import Scheduler
from services.worker.assignments import AssignmentReader
from shared.events import Nudger
from shared.keys import Keys
from shared.models import Heartbeat, LocalModel, ModelSpec, WorkerRegistration, WorkerView
from shared.settings import ManagerSettings
from shared.store import Store, connect
from tests.support import Cluster, Proc, RedisServer, register, status, wait_serving, wait_until

HOUR = 3600.0


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.redis_cluster)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    # Events off: nothing here may rest on a hint (the scheduler's hints are at most a
    # shortcut; its logs and versions are what it reads).
    if request.param == "cluster":
        nodes = request.getfixturevalue("redis_cluster").addresses
        client = connect("", cluster_nodes=nodes)
    else:
        client = connect(request.getfixturevalue("redis_server").url)
    s = Store(client, Keys(f"t{uuid.uuid4().hex[:10]}"), events=False)
    yield s
    await s.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` every 20 ms until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{check.__name__} did not hold in {timeout} s"
        await asyncio.sleep(0.02)


def spec(alias: str, **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


def scheduler(store: Store, resync_s: float = HOUR, sweep_s: float = 1e-6) -> Scheduler:
    # Every heartbeat key swept on every tick unless a test says otherwise: a key deleted
    # here (a lapsed heartbeat) is seen by the next tick.
    settings = ManagerSettings(manager_id="mgr", lease_ttl_s=30, resync_s=resync_s,
                               heartbeat_ttl_s=0.01, liveness_sweep_s=sweep_s)
    return Scheduler(store, settings, Nudger(store))


async def worker(store: Store, worker_id: str) -> None:
    await store.register_worker(WorkerRegistration(
        worker_id=worker_id, url=f"http://{worker_id}:1", engines=["sim"]), 60)


async def placed(store: Store, alias: str, workers: list[str]) -> list[str]:
    assigns = await store.assignments(workers)
    return sorted(w for w, mine in assigns.items() if alias in mine)


async def test_changes_are_acted_on_between_full_passes(store: Store) -> None:
    """Registration, spec change, deletion and a dead worker, each acted on by the next
    tick without a full pass."""
    await worker(store, "w1")
    await worker(store, "w2")
    s = scheduler(store)
    await s.tick()
    assert (s.full_passes, s.change_passes) == (1, 0)
    await store.register_model(spec("a"))
    await s.tick()
    assert await placed(store, "a", ["w1", "w2"]) != []
    await store.delete_model("a")
    await store.register_model(spec("a", replicas=2))  # a new spec for the alias
    await s.tick()
    assert await placed(store, "a", ["w1", "w2"]) == ["w1", "w2"]
    await store.register_model(spec("b"))
    await s.tick()
    [holder] = await placed(store, "b", ["w1", "w2"])
    other = "w2" if holder == "w1" else "w1"
    await store.r.delete(store.k.worker_alive(holder))  # its heartbeat lapses
    await s.tick()
    assert await placed(store, "b", ["w1", "w2"]) == [other]
    assert await placed(store, "a", ["w1", "w2"]) == [other]
    await store.delete_model("b")
    await s.tick()
    assert await placed(store, "b", ["w1", "w2"]) == []
    assert s.full_passes == 1 and s.change_passes == 5


async def test_a_heartbeat_key_is_checked_when_it_is_due_to_expire(store: Store) -> None:
    """No sweep: the scheduler reads each heartbeat key's TTL and checks it again when it is
    due. A worker that beats stays alive; one whose key runs out is acted on by the first
    tick after, without a sweep."""
    await worker(store, "w1")
    await worker(store, "w2")
    for w in ("w1", "w2"):
        await store.heartbeat(w, Heartbeat(), 0.4)  # a short TTL, as a worker's own
    s = scheduler(store, sweep_s=HOUR)
    await store.register_model(spec("a"))
    await s.tick()
    [holder] = await placed(store, "a", ["w1", "w2"])
    other = "w2" if holder == "w1" else "w1"

    async def holder_expired() -> bool:  # the other keeps beating; the holder's key runs out
        await store.heartbeat(other, Heartbeat(), 0.4)
        return not await store.r.exists(store.k.worker_alive(holder))

    await until(holder_expired)
    await s.tick()
    assert not await store.r.exists(store.k.worker_alive(holder))
    assert await placed(store, "a", ["w1", "w2"]) == [other]
    assert s.full_passes == 1


async def test_a_worker_back_before_liveness_is_trusted_keeps_its_models(store: Store) -> None:
    """Right after Redis comes back liveness is not trusted for a TTL; a worker found dead
    meanwhile that beats again before then is checked again before its assignments are
    taken away (its flag may be up to a second old)."""
    await worker(store, "w1")
    s = Scheduler(store, ManagerSettings(manager_id="mgr", lease_ttl_s=30, resync_s=HOUR,
                                         heartbeat_ttl_s=1.0, liveness_sweep_s=HOUR),
                  Nudger(store))
    await store.register_model(spec("a"))
    await store.heartbeat("w1", Heartbeat(), 0.4)  # a short TTL, read by the full pass
    await s.tick()
    assert await placed(store, "a", ["w1"]) == ["w1"]
    s.state.store_ok_since = time.monotonic()  # as if Redis had just come back

    async def key_gone() -> bool:
        return not await store.r.exists(store.k.worker_alive("w1"))

    async def trusted() -> bool:
        return time.monotonic() - s.state.store_ok_since >= 1.0

    await until(key_gone)
    await s.tick()  # its key is due and gone: found dead, its models kept (not trusted yet)
    assert not s._world.views["w1"].alive  # type: ignore[union-attr]
    await store.heartbeat("w1", Heartbeat(), 60)  # back, within DEAD_RECHECK_S
    await until(trusted)
    await s.tick()  # liveness trusted now: checked again, not forgotten
    assert await placed(store, "a", ["w1"]) == ["w1"]
    assert s._world.views["w1"].alive  # type: ignore[union-attr]


async def test_a_refused_liveness_read_fails_the_tick(redis_server: RedisServer) -> None:
    """A PTTL that Redis refuses (an ACL without it) says nothing of liveness: the tick
    fails as a refused command does, and no worker is taken for dead."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("nopttl", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-pttl"])
    host_port = redis_server.url.split("//", 1)[1]
    client = connect(f"redis://nopttl:pw@{host_port}")
    store = Store(client, Keys(f"t{uuid.uuid4().hex[:10]}"), events=False)
    try:
        await worker(store, "w1")
        s = scheduler(store)
        with pytest.raises(redis.exceptions.ResponseError):
            await s.tick()
        assert await store.alive(["w1"]) == {"w1"}
    finally:
        await store.close()
        admin.acl_deluser("nopttl")
        admin.close()


async def test_a_new_worker_takes_what_could_not_be_placed(store: Store) -> None:
    s = scheduler(store)
    await store.register_model(spec("a"))
    await s.tick()
    assert await store.placement_reason("a")
    await worker(store, "w1")
    await s.tick()
    assert await placed(store, "a", ["w1"]) == ["w1"]
    assert s.full_passes == 1


async def test_a_registration_reads_again_only_the_records_written_since(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights a worker reported just before a registration decide its placement, and the
    tick reads again that worker's record alone (its count in worker:revs moved)."""
    for w in ("w1", "w2", "w3"):
        await worker(store, w)
    s = scheduler(store)
    await s.tick()
    read: list[list[str]] = []
    by_id = store.workers_by_id

    async def counted(ids: list[str]) -> list[WorkerView]:
        read.append(list(ids))
        return await by_id(ids)

    monkeypatch.setattr(store, "workers_by_id", counted)
    assert await store.heartbeat("w2", Heartbeat(), 60) is True  # a bare beat: no write
    assert await store.heartbeat("w3", Heartbeat(
        local_models=[LocalModel(name="org/cached", size_mb=10)]), 60) is True
    await store.register_model(spec("a", model_name="org/cached"))
    await s.tick()
    assert await placed(store, "a", ["w1", "w2", "w3"]) == ["w3"]
    assert read == [["w3"]]
    assert (s.full_passes, s.change_passes) == (1, 1)


async def test_demand_is_acted_on_by_the_next_tick(store: Store) -> None:
    """A request waiting for a model scaled to zero (events off here: no hint): the intents
    log brings it to the next tick."""
    await worker(store, "w1")
    await store.register_model(spec("z", min_replicas=0))
    s = scheduler(store)
    await s.tick()
    await s.tick()
    assert await placed(store, "z", ["w1"]) == []
    await store.want("z", 30)
    await s.tick()
    assert await placed(store, "z", ["w1"]) == ["w1"]
    assert s.full_passes == 1


async def test_the_periodic_resync_repairs_an_unannounced_change(store: Store) -> None:
    """An assignment deleted behind the store's back (no version bump, no log entry, no
    hint): the ticks in between do not see it, the full resync puts it back."""
    await worker(store, "w1")
    await store.register_model(spec("a"))
    s = scheduler(store, resync_s=1.0)
    await s.tick()
    assert await placed(store, "a", ["w1"]) == ["w1"]
    await s.tick()  # reads back what the pass wrote (its own writes moved w1's version)
    await store.r.hdel(store.k.assign("w1"), "a")
    await s.tick()
    assert s.change_passes == 2  # a tick that looked only at what was announced
    assert await placed(store, "a", ["w1"]) == []
    # Due RESYNC_S (1 s) after the last, or 50 times its duration when that is longer.
    deadline = time.monotonic() + 30
    while s.full_passes < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await s.tick()
    assert s.full_passes == 2
    assert await placed(store, "a", ["w1"]) == ["w1"]


async def test_a_log_that_does_not_cover_its_counter_makes_a_full_pass(store: Store) -> None:
    """A models version bumped with no log entry (an older writer, a Redis that lost data):
    the tick cannot tell what changed, so it looks at everything."""
    await worker(store, "w1")
    s = scheduler(store)
    await s.tick()
    await store.r.hset(store.k.model("x"), mapping={
        "spec": spec("x").model_dump_json(), "version": "v1", "created_at": "1"})
    await store.r.sadd(store.k.models, "x")
    await store.r.incr(store.k.models_version)
    await s.tick()
    assert s.full_passes == 2
    assert await placed(store, "x", ["w1"]) == ["w1"]


async def test_worker_rereads_only_what_changed(store: Store) -> None:
    await worker(store, "w1")
    s = scheduler(store)
    await s.tick()
    reader = AssignmentReader(store, "w1", resync_s=HOUR)
    assert (await reader.current()).assigned == {}
    for _ in range(3):
        await reader.current()
    assert reader.reads == 1  # nothing changed: the versions only
    await store.register_model(spec("a"))
    await s.tick()
    snap = await reader.current()
    assert list(snap.assigned) == ["a"] and snap.models["a"].spec.alias == "a"
    assert snap.reserved == set()
    assert reader.reads == 2
    # Behind the store's back: unseen until the resync (here forced by a short period).
    await store.r.hdel(store.k.assign("w1"), "a")
    assert list((await reader.current()).assigned) == ["a"]
    reader.resync_s = 0.0
    assert (await reader.current()).assigned == {}


async def test_with_hints_on_the_versions_are_read_on_a_hint_or_every_poll_s(
        store: Store) -> None:
    await worker(store, "w1")
    s = scheduler(store)
    await s.tick()
    reader = AssignmentReader(store, "w1", resync_s=HOUR, poll_s=HOUR)
    assert (await reader.current(hinted=False)).assigned == {}  # the first call reads
    await store.register_model(spec("a"))
    await s.tick()
    assert await placed(store, "a", ["w1"]) == ["w1"]
    assert (await reader.current(hinted=False)).assigned == {}  # no hint: not looked at
    assert list((await reader.current(hinted=True)).assigned) == ["a"]
    await store.delete_model("a")
    await s.tick()
    reader.poll_s = 0.0  # the poll is due: read without a hint
    assert (await reader.current(hinted=False)).assigned == {}


def test_an_assignment_reaches_its_worker_without_polling(cluster: Cluster) -> None:
    """Scheduler and worker timers out of reach (an hour): a registration is still placed
    and served at once, carried by the hints and the versions alone."""
    slow = {"SCHEDULE_INTERVAL_S": str(HOUR), "RECONCILE_INTERVAL_S": str(HOUR)}
    cluster.manager(**slow)
    cluster.worker("w1", **slow)
    router = cluster.router()
    wait_until(lambda: _alive(router) == ["w1"], 20, what="worker registered")
    assert register(router, "quick", engine="sim").status_code == 201
    wait_serving(router, "quick", 20)


def test_resync_repairs_a_change_whose_hint_was_lost(cluster: Cluster) -> None:
    """Hints off, and an assignment deleted behind the store's back (no version, no log):
    the manager's periodic full resync puts it back and the worker serves again."""
    cluster.extra_env["EVENTS_ENABLED"] = "false"
    cluster.manager(RESYNC_S="2")
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "lost", engine="sim").status_code == 201
    wait_serving(router, "lost", 30)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        assert r.hdel(Keys(cluster.prefix).assign("w1"), "lost") == 1
        wait_until(lambda: r.hexists(Keys(cluster.prefix).assign("w1"), "lost"), 15,
                   interval=0.1, what="the resync re-assigns it")
    finally:
        r.close()
    wait_serving(router, "lost", 30)


def _alive(router: Proc) -> list[str]:
    return sorted(w["worker_id"] for w in status(router).get("workers", []) if w.get("alive"))
