"""MAX_CPU_ENGINES in placement: a worker without GPUs takes no more engines than its cap,
with the reason shown like other placement reasons; workers with GPUs are unaffected."""

from __future__ import annotations

from services.manager.placement import Choice, Refusal, WorkerOrder, choose_worker
from shared.models import Assignment, GpuInfo, ModelSpec, WorkerView


def spec(alias: str = "m", **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"}
                                    | kw)


def cpu_worker(wid: str, cap: int | None) -> WorkerView:
    return WorkerView(worker_id=wid, alive=True, engines=["sim"], max_cpu_engines=cap)


def running(wid: str, n: int) -> dict[str, Assignment]:
    return {f"x{i}": Assignment(alias=f"x{i}", worker_id=wid) for i in range(n)}


def test_a_worker_at_its_cap_is_refused_with_the_reason() -> None:
    ws = [cpu_worker("a", 2)]
    assert isinstance(choose_worker(spec(), ws, {"a": running("a", 1)}), Choice)
    c = choose_worker(spec(), ws, {"a": running("a", 2)})
    assert isinstance(c, Refusal)
    assert c.text() == "a: runs 2 engine(s) without GPUs, its cap (MAX_CPU_ENGINES=2)"


def test_the_next_worker_below_its_cap_is_chosen_also_by_the_order() -> None:
    ws = [cpu_worker("a", 1), cpu_worker("b", 8)]
    assigns = {"a": running("a", 1), "b": running("b", 3)}
    c = choose_worker(spec(), ws, assigns)
    assert isinstance(c, Choice) and c.worker_id == "b"  # "a" is less loaded, but full
    order = WorkerOrder(ws, assigns)
    c = choose_worker(spec(), ws, assigns, order=order)
    assert isinstance(c, Choice) and c.worker_id == "b"


def test_zero_means_no_cpu_engines_and_none_means_no_cap_reported() -> None:
    assert isinstance(choose_worker(spec(), [cpu_worker("a", 0)], {"a": {}}), Refusal)
    c = choose_worker(spec(), [cpu_worker("a", None)], {"a": running("a", 50)})
    assert isinstance(c, Choice)


def test_workers_with_gpus_are_not_capped() -> None:
    w = WorkerView(worker_id="g", alive=True, engines=["sim"], max_cpu_engines=0,
                   gpus=[GpuInfo(index=0, memory_total_mb=80_000, memory_free_mb=80_000)])
    c = choose_worker(spec(gpu_memory_mb=1000), [w], {"g": running("g", 5)})
    assert isinstance(c, Choice) and c.gpus == [0]
