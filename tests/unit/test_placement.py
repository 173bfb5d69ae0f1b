from __future__ import annotations

from services.manager.placement import Choice, Refusal, choose_worker
from shared.models import Assignment, GpuInfo, ModelSpec, WorkerView


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
    assert c.reserved_mb == 2 * 72_000
    r = choose_worker(spec(tensor_parallel_size=3), [w], {"a": {}})
    assert isinstance(r, Refusal) and "2 of 3 have it" in r.text()


def test_reservations_count_against_free_memory() -> None:
    w = worker("a", gpus=[gpu(0)])
    half = spec(gpu_memory_utilization=0.45)
    first = choose_worker(half, [w], {"a": {}})
    assert isinstance(first, Choice) and first.gpus == [0]
    taken = {"a": {"x": Assignment(alias="x", worker_id="a", gpus=[0],
                                   reserved_mb=first.reserved_mb)}}
    second = choose_worker(half, [w], taken)
    assert isinstance(second, Choice)
    both = taken["a"] | {"y": Assignment(alias="y", worker_id="a", gpus=[0],
                                          reserved_mb=first.reserved_mb)}
    assert isinstance(choose_worker(half, [w], {"a": both}), Refusal)
