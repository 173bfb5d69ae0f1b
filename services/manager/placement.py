"""Pure placement decisions: inputs in, a choice (or the reasons for none) out. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.models import Assignment, GpuInfo, ModelSpec, WorkerView

# vLLM's own default when the spec sets no --gpu-memory-utilization.
DEFAULT_GPU_UTILIZATION = 0.9


@dataclass(frozen=True)
class Choice:
    worker_id: str
    gpus: list[int]
    reserved_mb: int


@dataclass
class Refusal:
    """Why no worker fits: one line per worker considered (or a single general reason)."""

    reasons: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "no worker fits"


def _available_mb(gpu: GpuInfo, reserved_mb: int) -> int:
    # free memory already excludes running engines; reservations also cover engines that
    # are still starting. Either bound may be the tighter one, so take the smaller.
    return max(0, min(gpu.memory_free_mb, gpu.memory_total_mb - reserved_mb))


def _reserved_by_gpu(assigned: list[Assignment]) -> dict[int, int]:
    out: dict[int, int] = {}
    for a in assigned:
        for g in a.gpus:
            out[g] = out.get(g, 0) + a.reserved_mb // max(1, len(a.gpus))
    return out


def _fit_gpus(spec: ModelSpec, w: WorkerView, assigned: list[Assignment]) -> Choice | str:
    """GPUs of ``w`` for ``spec``, or why there are none."""
    if not w.gpus:
        return Choice(w.worker_id, [], 0)
    util = spec.gpu_memory_utilization or DEFAULT_GPU_UTILIZATION
    reserved = _reserved_by_gpu(assigned)
    fitting = []
    for g in w.gpus:
        need = int(g.memory_total_mb * util)
        avail = _available_mb(g, reserved.get(g.index, 0))
        if avail >= need:
            fitting.append((avail, g.index, need))
    tp = spec.tensor_parallel_size
    if len(fitting) < tp:
        return (
            f"{w.worker_id}: needs {tp} GPU(s) with {util:.0%} of memory free, "
            f"{len(fitting)} of {len(w.gpus)} have it"
        )
    fitting.sort(key=lambda t: (-t[0], t[1]))
    chosen = fitting[:tp]
    return Choice(w.worker_id, sorted(i for _, i, _ in chosen), sum(n for _, _, n in chosen))


def choose_worker(
    spec: ModelSpec,
    workers: list[WorkerView],
    assignments: dict[str, dict[str, Assignment]],
) -> Choice | Refusal:
    """Pick a live worker for one more replica of ``spec``.

    Skips workers that already run the alias (replicas spread over machines), honours a pinned
    ``worker_id``, requires the engine, and prefers the least loaded worker.
    """
    refusal = Refusal()
    candidates: list[tuple[int, str, Choice]] = []
    for w in workers:
        mine = assignments.get(w.worker_id, {})
        if spec.worker_id and w.worker_id != spec.worker_id:
            continue
        if not w.alive:
            refusal.reasons.append(f"{w.worker_id}: not alive")
        elif spec.alias in mine:
            refusal.reasons.append(f"{w.worker_id}: already runs it")
        elif spec.engine not in w.engines:
            refusal.reasons.append(
                f"{w.worker_id}: engine '{spec.engine}' not available "
                f"(has {', '.join(w.engines) or 'none'})"
            )
        elif spec.engine == "vllm" and spec.sleep_mode and not w.gpus:
            # vLLM's sleep mode needs CUDA memory pools: a CPU-only vLLM would fail to start.
            refusal.reasons.append(f"{w.worker_id}: vLLM sleep mode (idle_sleep_s) needs a GPU")
        else:
            fit = _fit_gpus(spec, w, list(mine.values()))
            if isinstance(fit, str):
                refusal.reasons.append(fit)
            else:
                candidates.append((len(mine), w.worker_id, fit))
    if candidates:
        return min(candidates, key=lambda c: (c[0], c[1]))[2]
    if spec.worker_id and not refusal.reasons:
        refusal.reasons.append(f"pinned worker '{spec.worker_id}' is not registered")
    if not workers:
        refusal.reasons.append("no workers registered")
    return refusal
