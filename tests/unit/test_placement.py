from __future__ import annotations

from services.manager.placement import Choice, Refusal, choose_worker
from shared.models import Assignment, GpuInfo, ModelSpec, Reservation, WorkerView


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
