from __future__ import annotations

import json
import random
from typing import Any

import fakeredis
import pytest

from services.manager import scheduler as sched
from services.manager.placement import Choice, Refusal, WorkerOrder, choose_worker
from shared.events import Nudger
from shared.keys import Keys
from shared.models import (
    Assignment,
    GpuInfo,
    ModelSpec,
    Reservation,
    WorkerRegistration,
    WorkerView,
)
from shared.settings import ManagerSettings
from shared.store import NotLeader, Store
from shared.store.scheduling import Unassign


def spec(**kw) -> ModelSpec:
    return ModelSpec.model_validate({"alias": "m", "model_name": "org/m", "engine": "vllm"} | kw)


def gpu(i: int, total: int = 80_000, free: int = 80_000) -> GpuInfo:
    return GpuInfo(index=i, memory_total_mb=total, memory_free_mb=free,
                   memory_used_mb=total - free)


def worker(wid: str, engines=("vllm", "sim"), gpus=(), alive=True) -> WorkerView:
    return WorkerView(worker_id=wid, alive=alive, engines=list(engines), gpus=list(gpus))


def test_picks_least_loaded_live_worker() -> None:
    ws = [worker("a"), worker("b"), worker("c", alive=False)]
    assigns = {"a": {"x": Assignment(alias="x", worker_id="a")}, "b": {}, "c": {}}
    c = choose_worker(spec(), ws, assigns)
    assert isinstance(c, Choice) and c.worker_id == "b"


def test_requires_engine_and_explains() -> None:
    c = choose_worker(spec(), [worker("a", engines=["sim"])], {"a": {}})
    assert isinstance(c, Refusal)
    assert "engine 'vllm' not available" in c.text()


def test_no_workers() -> None:
    c = choose_worker(spec(), [], {})
    assert isinstance(c, Refusal) and "no workers registered" in c.text()


def test_skips_worker_already_running_alias() -> None:
    ws = [worker("a"), worker("b")]
    assigns = {"a": {"m": Assignment(alias="m", worker_id="a")}, "b": {}}
    c = choose_worker(spec(replicas=2), ws, assigns)
    assert isinstance(c, Choice) and c.worker_id == "b"
    full = {"a": assigns["a"], "b": {"m": Assignment(alias="m", worker_id="b")}}
    assert isinstance(choose_worker(spec(replicas=3), ws, full), Refusal)


def test_pinned_worker_only() -> None:
    ws = [worker("a"), worker("b")]
    c = choose_worker(spec(worker_id="b"), ws, {"a": {}, "b": {}})
    assert isinstance(c, Choice) and c.worker_id == "b"
    r = choose_worker(spec(worker_id="zz"), ws, {"a": {}, "b": {}})
    assert isinstance(r, Refusal) and "pinned worker 'zz'" in r.text()


def test_vllm_sleep_mode_needs_a_gpu() -> None:
    r = choose_worker(spec(idle_sleep_s=60), [worker("cpu")], {"cpu": {}})
    assert isinstance(r, Refusal) and "sleep mode" in r.text()
    ok = choose_worker(spec(idle_sleep_s=60), [worker("g", gpus=[gpu(0)])], {"g": {}})
    assert isinstance(ok, Choice)


def test_gpu_memory_fit_and_tensor_parallel() -> None:
    w = worker("a", gpus=[gpu(0, free=10_000), gpu(1), gpu(2)])
    c = choose_worker(spec(tensor_parallel_size=2), [w], {"a": {}})
    assert isinstance(c, Choice) and c.gpus == [1, 2]
    assert c.mb_per_gpu == 72_000 and c.utilization == 0.9
    r = choose_worker(spec(tensor_parallel_size=3), [w], {"a": {}})
    assert isinstance(r, Refusal) and "2 of 3 have it" in r.text()


def reserve(alias: str, gpus: list[int], mb: int) -> Reservation:
    return Reservation(alias=alias, gpus=gpus, mb_per_gpu=mb)


def test_packs_models_on_one_gpu_with_computed_utilisation() -> None:
    # 2 GB used by someone else, as the worker reports it.
    other = gpu(0, total=80_000, free=78_000).model_copy(update={"foreign_used_mb": 2_000})
    w = worker("a", gpus=[other])
    first = choose_worker(spec(gpu_memory_mb=30_000), [w], {"a": {}}, {"a": {}})
    assert isinstance(first, Choice) and first.gpus == [0] and first.utilization == 0.375
    ledger = {"a": {"x": reserve("x", [0], 30_000)}}
    second = choose_worker(spec(gpu_memory_utilization=0.5), [w], {"a": {}}, ledger)
    assert isinstance(second, Choice) and second.mb_per_gpu == 40_000
    ledger["a"]["y"] = reserve("y", [0], 40_000)
    third = choose_worker(spec(gpu_memory_mb=9_000), [w], {"a": {}}, ledger)
    # 80,000 - 70,000 reserved - 2,000 foreign = 8,000 left: refused, with the numbers.
    assert isinstance(third, Refusal)
    assert "needs 1 GPU(s) with 9000 MB free" in third.text()
    assert "most free: 8000 MB" in third.text()


def test_foreign_memory_counts_against_the_gpu() -> None:
    busy = gpu(0, total=80_000, free=20_000).model_copy(update={"foreign_used_mb": 60_000})
    w = worker("a", gpus=[busy])
    assert isinstance(choose_worker(spec(gpu_memory_mb=20_000), [w], {"a": {}}), Choice)
    assert isinstance(choose_worker(spec(gpu_memory_mb=20_001), [w], {"a": {}}), Refusal)


def test_reservation_outlives_its_assignment_until_released() -> None:
    """A stopping engine still holds memory: its ledger entry keeps the GPU taken."""
    w = worker("a", gpus=[gpu(0)])
    still_held = {"a": {"old": reserve("old", [0], 72_000)}}
    assert isinstance(choose_worker(spec(), [w], {"a": {}}, still_held), Refusal)
    assert isinstance(choose_worker(spec(), [w], {"a": {}}, {"a": {}}), Choice)


def test_spreads_over_least_loaded_gpus_and_workers() -> None:
    w = worker("a", gpus=[gpu(0), gpu(1)])
    ledger = {"a": {"x": reserve("x", [0], 20_000)}}
    c = choose_worker(spec(gpu_memory_mb=10_000), [w], {"a": {}}, ledger)
    assert isinstance(c, Choice) and c.gpus == [1]


# ---------------------------------------------------------------- the preference order, pinned
def test_least_loaded_then_worker_id_order_and_every_refusal_reason() -> None:
    """Fewest assignments wins, ties go to the smallest worker id (not list order); when
    nothing fits, one reason per worker, in list order, with the ordered path too."""
    ws = [worker("d"), worker("c"), worker("b"), worker("a", engines=["sim"])]
    one = {"x": Assignment(alias="x", worker_id="?")}
    assigns: dict[str, dict[str, Assignment]] = {"d": {}, "c": {}, "b": dict(one), "a": {}}
    for order in (None, WorkerOrder(ws, assigns)):
        c = choose_worker(spec(), ws, assigns, None, order)
        assert isinstance(c, Choice) and c.worker_id == "c"  # 0 < 1; "c" < "d"; "a" lacks vllm
    assigns["c"] = dict(one)
    assigns["d"] = dict(one) | {"y": Assignment(alias="y", worker_id="d")}
    for order in (None, WorkerOrder(ws, assigns)):
        c = choose_worker(spec(), ws, assigns, None, order)
        assert isinstance(c, Choice) and c.worker_id == "b"  # b, c at 1: "b" first; d at 2

    dead = worker("e", alive=False)
    gpu_full = worker("f", gpus=[gpu(0, total=10_000, free=10_000)])
    ws = [worker("d"), dead, worker("a", engines=["sim"]), gpu_full, worker("b")]
    assigns = {"d": {"m": Assignment(alias="m", worker_id="d")}, "e": {}, "a": {}, "f": {},
               "b": {"m": Assignment(alias="m", worker_id="b")}}
    expected = ["d: already runs it", "e: not alive",
                "a: engine 'vllm' not available (has sim)",
                "f: needs 1 GPU(s) with 9000 MB free, 0 of 1 have it (most free: 0 MB)",
                "b: already runs it"]
    ledgers = {"f": {"z": reserve("z", [0], 10_000)}}
    for order in (None, WorkerOrder(ws, assigns, ledgers)):
        r = choose_worker(spec(), ws, assigns, ledgers, order)
        assert isinstance(r, Refusal) and r.reasons == expected


def test_order_must_match_the_inputs() -> None:
    ws = [worker("a")]
    assigns: dict[str, dict[str, Assignment]] = {"a": {}}
    with pytest.raises(ValueError):
        choose_worker(spec(), list(ws), assigns, None, WorkerOrder(ws, assigns))


def _random_worker(rng: random.Random, i: int) -> WorkerView:
    gpus = [gpu(g, total=rng.choice([24_000, 80_000]), free=rng.choice([24_000, 20_000, 5_000]))
            for g in range(rng.choice([0, 0, 1, 2, 4]))]
    engines = rng.choice([("vllm",), ("vllm", "sim"), ("sim",)])
    # Ids out of list order, and now and then the same id twice.
    wid = f"w{rng.randrange(i + 3):02d}"
    return worker(wid, engines=engines, gpus=gpus, alive=rng.random() > 0.1)


def _random_spec(rng: random.Random, i: int, ids: list[str]) -> ModelSpec:
    kw: dict[str, object] = {"alias": f"m{i % 12}", "engine": rng.choice(["vllm", "vllm", "sim"])}
    if rng.random() < 0.1:
        kw["worker_id"] = rng.choice([*ids, "nobody"])
    if rng.random() < 0.4:
        kw["gpu_memory_mb"] = rng.choice([2_000, 8_000, 30_000])
    if rng.random() < 0.2:
        kw["tensor_parallel_size"] = 2
    if rng.random() < 0.1:
        kw["idle_sleep_s"] = 60
    return spec(**kw)


@pytest.mark.parametrize("seed", range(40))
def test_ordered_choice_is_the_full_scans_over_random_passes(seed: int) -> None:
    """A pass's worth of choices, assignments and removals: the kept-up order picks exactly
    what a full scan picks (the same Choice, or the same Refusal) every time."""
    rng = random.Random(seed)
    ws = [_random_worker(rng, i) for i in range(rng.randrange(0, 14))]
    ids = sorted({w.worker_id for w in ws})
    assigns: dict[str, dict[str, Assignment]] = {w: {} for w in ids}
    ledgers: dict[str, dict[str, Reservation]] = {}
    for w in ids:  # some load and some memory already taken
        for k in range(rng.randrange(3)):
            assigns[w][f"pre{k}"] = Assignment(alias=f"pre{k}", worker_id=w)
        if rng.random() < 0.5:
            ledgers[w] = {"old": reserve("old", [0], rng.choice([1_000, 10_000, 60_000]))}
    order = WorkerOrder(ws, assigns, ledgers)
    for i in range(150):
        s = _random_spec(rng, i, ids)
        full = choose_worker(s, ws, assigns, ledgers)
        assert choose_worker(s, ws, assigns, ledgers, order) == full
        assert order.current()
        if isinstance(full, Choice) and rng.random() < 0.8:
            assigns[full.worker_id][s.alias] = Assignment(alias=s.alias, worker_id=full.worker_id)
            if full.gpus:
                ledgers.setdefault(full.worker_id, {})[s.alias] = reserve(
                    s.alias, full.gpus, full.mb_per_gpu)
            order.touch(full.worker_id)
        if ids and rng.random() < 0.3:  # a removal: an assignment, or a released reservation
            w = rng.choice(ids)
            if assigns[w] and rng.random() < 0.7:
                del assigns[w][rng.choice(sorted(assigns[w]))]
            elif ledgers.get(w):
                del ledgers[w][rng.choice(sorted(ledgers[w]))]
            order.touch(w)


async def test_scheduler_pass_chooses_as_a_full_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real reconcile pass (fakeredis): each of its ordered choices equals a full scan at
    that moment, so the scheduler keeps the order in step with what it assigns."""
    calls: list[str] = []

    def checked(s: ModelSpec, ws: list[WorkerView], assigns: Any, ledgers: Any,
                order: WorkerOrder | None = None) -> Choice | Refusal:
        assert order is not None and order.current()
        full = choose_worker(s, ws, assigns, ledgers)
        assert choose_worker(s, ws, assigns, ledgers, order) == full
        calls.append(full.worker_id if isinstance(full, Choice) else "-")
        return full

    monkeypatch.setattr(sched, "choose_worker", checked)
    rng = random.Random(7)
    store = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    try:
        for i in range(12):
            gpus = [gpu(g) for g in range(rng.choice([0, 1, 2]))]
            await store.register_worker(WorkerRegistration(
                worker_id=f"w{(i * 7) % 12:02d}", url="http://x:1", engines=["vllm", "sim"],
                gpus=gpus), 60)
        for i in range(60):
            kw: dict[str, object] = {"replicas": rng.choice([1, 1, 2, 3])}
            if rng.random() < 0.3:
                kw["gpu_memory_mb"] = rng.choice([10_000, 40_000])
            if rng.random() < 0.1:
                kw["worker_id"] = f"w{rng.randrange(12):02d}"
            await store.register_model(spec(alias=f"a{i:02d}", **kw))
        # Every tick a full pass (RESYNC_S tiny, whatever a pass takes): the specs are
        # changed below behind the store's back (no models log entry), which only a full
        # pass sees.
        monkeypatch.setattr(sched, "RESYNC_SHARE", 0)
        settings = ManagerSettings(manager_id="m", lease_ttl_s=60, resync_s=1e-6)
        scheduler = sched.Scheduler(store, settings, Nudger(store))
        await scheduler.tick()
        first = list(calls)
        assert len([c for c in first if c != "-"]) > 60
        # Models scaled down (early in the pass) and a worker dead: the next pass removes
        # replicas, then re-places the dead worker's models on the same order rules.
        scaled = 0
        for m in await store.list_models():
            if m.spec.replicas > 1 and m.spec.worker_id is None:
                smaller = m.spec.model_copy(update={"replicas": 1})
                await store.r.hset(store.k.model(m.spec.alias), "spec", smaller.model_dump_json())
                scaled += m.spec.replicas - 1
        assert scaled
        await store.r.delete(store.k.worker_alive("w03"))
        calls.clear()
        await scheduler.tick()
        assert calls and "w03" not in calls
        placed = await store.assignments(f"w{i:02d}" for i in range(12))
        assert placed["w03"] == {}
        assert sum(len(a) for a in placed.values()) <= sum(c != "-" for c in first) - scaled
    finally:
        await store.close()


# ---------------------------------------------------------------- batched fenced writes
async def test_write_fenced_batch_lands_whole_with_one_hint_or_not_at_all() -> None:
    store = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    try:
        epoch = await store.acquire_lease("mgr", 5)
        token = f"mgr|{epoch}"
        await store.set_placement_reason("m1", "no room")
        pubsub = store.r.pubsub()
        await pubsub.subscribe(store.k.events)
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        await store.write_fenced(token, [
            Assignment(alias="m1", worker_id="w1", gpus=[0], mb_per_gpu=1000),
            Assignment(alias="m2", worker_id="w1"),
            Unassign("w1", "m2"),
        ])
        assert list(await store.worker_assignments("w1")) == ["m1"]
        assert list((await store.ledgers(["w1"]))["w1"]) == ["m1"]
        assert await store.placement_reason("m1") is None
        hint = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        assert hint is not None and json.loads(hint["data"]) == {"kind": "assign",
                                                                 "worker": "w1"}
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1) is None
        await pubsub.aclose()  # type: ignore[no-untyped-call]

        await store.release_lease(token)
        await store.acquire_lease("other", 5)
        with pytest.raises(NotLeader):
            await store.write_fenced(token, [Assignment(alias="m3", worker_id="w2"),
                                             Unassign("w1", "m1")])
        after = await store.assignments(["w1", "w2"])
        assert {w: list(a) for w, a in after.items()} == {"w1": ["m1"], "w2": []}
    finally:
        await store.close()
