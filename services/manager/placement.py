"""Pure placement decisions: inputs in, a choice (or the reasons for none) out. No I/O.

GPU memory is accounted per GPU from the ledger (reservations of every instance the pool put
on a worker, released only once its engine is confirmed gone) plus the memory used by
processes the pool does not own. Several models share a GPU when their reservations fit;
``tensor_parallel_size`` GPUs of one worker are taken for a sharded model.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from shared.models import Assignment, GpuInfo, ModelSpec, Reservation, WorkerView

# vLLM's own default when the spec sets no --gpu-memory-utilization.
DEFAULT_GPU_UTILIZATION = 0.9

Ledger = Mapping[str, Reservation]


@dataclass(frozen=True)
class Choice:
    worker_id: str
    gpus: list[int]
    mb_per_gpu: int
    # The fraction of each chosen GPU's total the engine may use: the reservation, so that
    # instances packed on one GPU all start.
    utilization: float | None


@dataclass
class Refusal:
    """Why no worker fits: one line per worker considered (or a single general reason)."""

    reasons: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "no worker fits"


def need_mb(spec: ModelSpec, gpu: GpuInfo) -> int:
    if spec.gpu_memory_mb is not None:
        return spec.gpu_memory_mb
    return int(gpu.memory_total_mb * (spec.gpu_memory_utilization or DEFAULT_GPU_UTILIZATION))


def reserved_by_gpu(ledger: Ledger) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in ledger.values():
        for g in r.gpus:
            out[g] = out.get(g, 0) + r.mb_per_gpu
    return out


def available_mb(gpu: GpuInfo, reserved: int) -> int:
    """Memory left on ``gpu`` for a new reservation."""
    foreign = gpu.foreign_used_mb
    if foreign is None:
        # No per-process view: what is used beyond our reservations belongs to others.
        foreign = max(0, gpu.memory_used_mb - reserved)
    return max(0, gpu.memory_total_mb - reserved - foreign)


def _fit_gpus(
    spec: ModelSpec, w: WorkerView, ledger: Ledger, reserved: Mapping[int, int] | None = None
) -> Choice | str:
    """GPUs of ``w`` for ``spec``, or why there are none. ``reserved``: the ledger's
    :func:`reserved_by_gpu`, when the caller already has it."""
    if not w.gpus:
        return Choice(w.worker_id, [], 0, spec.gpu_memory_utilization)
    if reserved is None:
        reserved = reserved_by_gpu(ledger)
    free = {g.index: available_mb(g, reserved.get(g.index, 0)) for g in w.gpus}
    # Most free first: spreads load and keeps room for big models on the emptier GPUs.
    fitting = sorted((g for g in w.gpus if free[g.index] >= need_mb(spec, g)),
                     key=lambda g: (-free[g.index], g.index))
    tp = spec.tensor_parallel_size
    if len(fitting) < tp:
        need = min(need_mb(spec, g) for g in w.gpus)
        return (f"{w.worker_id}: needs {tp} GPU(s) with {need} MB free, {len(fitting)} of "
                f"{len(w.gpus)} have it (most free: {max(free.values())} MB)")
    chosen = fitting[:tp]
    mb = max(need_mb(spec, g) for g in chosen)
    total = min(g.memory_total_mb for g in chosen)
    util = math.floor(mb / total * 1000) / 1000 if total else None
    return Choice(w.worker_id, sorted(g.index for g in chosen), mb, util)


def _unfit_reason(spec: ModelSpec, w: WorkerView, mine: Mapping[str, Assignment]) -> str | None:
    if not w.alive:
        return f"{w.worker_id}: not alive"
    if spec.alias in mine:
        return f"{w.worker_id}: already runs it"
    if spec.engine not in w.engines:
        return (f"{w.worker_id}: engine '{spec.engine}' not available "
                f"(has {', '.join(w.engines) or 'none'})")
    if spec.engine == "vllm" and spec.sleep_mode and not w.gpus:
        # vLLM's sleep mode needs CUDA memory pools: a CPU-only vLLM would fail to start.
        return f"{w.worker_id}: vLLM sleep mode (idle_sleep_s) needs a GPU"
    return _cpu_cap_reason(w, mine)


def _cpu_cap_reason(w: WorkerView, mine: Mapping[str, Assignment]) -> str | None:
    """On a worker without GPUs every engine runs on its CPUs and RAM, and nothing else
    bounds how many: its MAX_CPU_ENGINES does (25 registrations once started 31 engines)."""
    cap = w.max_cpu_engines
    if w.gpus or cap is None:
        return None
    running = sum(1 for a in mine.values() if not a.gpus)
    if running >= cap:
        return (f"{w.worker_id}: runs {running} engine(s) without GPUs, its cap "
                f"(MAX_CPU_ENGINES={cap})")
    return None


def fit_on(spec: ModelSpec, w: WorkerView, ledger: Ledger,
           mine: Mapping[str, Assignment] | None = None) -> Choice | str:
    """GPUs of the one worker an operator placed ``spec`` on by hand, or why it does not fit:
    the same checks and memory reservation as any placement (a manual placement that skipped
    the ledger let the scheduler overcommit the GPU); ``mine``: the worker's assignments (its
    cap on engines without GPUs counts them)."""
    return _unfit_reason(spec, w, mine or {}) or _fit_gpus(spec, w, ledger)


class WorkerOrder:
    """The workers of one scheduling pass in the order :func:`choose_worker` prefers them:
    least loaded (fewest assignments) first, ties by worker id, then by position in the list.

    With it, a choice stops at the first worker that fits instead of scanning every worker
    (a pass placing every alias grew with workers x aliases). It reads ``assignments`` and
    ``ledgers`` as they are when a worker is (re)ranked: after changing a worker's
    assignments or ledger, call :meth:`touch` with its id before the next choice.
    """

    def __init__(
        self,
        workers: Sequence[WorkerView],
        assignments: Mapping[str, Mapping[str, Assignment]],
        ledgers: Mapping[str, Ledger] | None = None,
    ) -> None:
        self.workers = workers
        self.assignments = assignments
        self.ledgers = ledgers
        # The caller's own mapping, even empty: it may fill it in later.
        self._ledgers: Mapping[str, Ledger] = {} if ledgers is None else ledgers
        self._positions: dict[str, list[int]] = {}
        for pos, w in enumerate(workers):
            self._positions.setdefault(w.worker_id, []).append(pos)
        # (load, worker id, position), kept sorted.
        self._ranked = sorted(self._key(pos) for pos in range(len(workers)))
        self._keys = {key[2]: key for key in self._ranked}
        self._reserved: dict[str, dict[int, int]] = {}
        # Model name -> the workers with its weights on their disks, built once per pass so
        # that preferring them costs a lookup per choice, not a scan of every worker.
        self.with_weights: dict[str, list[WorkerView]] = {}
        for w in workers:
            for m in w.local_models:
                self.with_weights.setdefault(m.name, []).append(w)

    def _key(self, pos: int) -> tuple[int, str, int]:
        wid = self.workers[pos].worker_id
        return len(self.assignments.get(wid, {})), wid, pos

    def touch(self, worker_id: str) -> None:
        """Re-rank ``worker_id`` after its assignments or ledger changed."""
        self._reserved.pop(worker_id, None)
        for pos in self._positions.get(worker_id, ()):
            old, new = self._keys[pos], self._key(pos)
            if old != new:
                del self._ranked[bisect.bisect_left(self._ranked, old)]
                bisect.insort(self._ranked, new)
                self._keys[pos] = new

    def reserved(self, worker_id: str) -> dict[int, int]:
        """:func:`reserved_by_gpu` of the worker's ledger, computed once until it is touched."""
        out = self._reserved.get(worker_id)
        if out is None:
            out = self._reserved[worker_id] = reserved_by_gpu(self._ledgers.get(worker_id, {}))
        return out

    def current(self) -> bool:
        """Whether every rank and cached reservation matches the inputs now (for tests)."""
        return (self._ranked == sorted(self._key(pos) for pos in range(len(self.workers)))
                and all(r == reserved_by_gpu(self._ledgers.get(w, {}))
                        for w, r in self._reserved.items()))

    def ranked(self, worker_id: str | None = None) -> Iterator[tuple[int, WorkerView]]:
        """(load, worker) in preference order; only the workers named ``worker_id`` if set."""
        if worker_id is None:
            keys: Sequence[tuple[int, str, int]] = self._ranked
        else:
            keys = sorted(self._keys[pos] for pos in self._positions.get(worker_id, ()))
        for load, _, pos in keys:
            yield load, self.workers[pos]

    def first_fit(self, spec: ModelSpec) -> Choice | None:
        """The worker a full scan would choose, or None when none fits (or, defensively,
        when a worker's rank is found out of date: the full scan then decides)."""
        for load, w in self.ranked(spec.worker_id or None):
            mine = self.assignments.get(w.worker_id, {})
            if len(mine) != load:
                return None
            if _unfit_reason(spec, w, mine) is not None:
                continue
            fit = _fit_gpus(spec, w, self._ledgers.get(w.worker_id, {}),
                            self.reserved(w.worker_id))
            if isinstance(fit, Choice):
                return fit
        return None


def choose_worker(
    spec: ModelSpec,
    workers: list[WorkerView],
    assignments: Mapping[str, Mapping[str, Assignment]],
    ledgers: Mapping[str, Ledger] | None = None,
    order: WorkerOrder | None = None,
) -> Choice | Refusal:
    """Pick a live worker for one more replica of ``spec``.

    Skips workers that already run the alias (replicas spread over machines), honours a pinned
    ``worker_id``, requires the engine and the GPU memory. Prefers a worker that has the
    model's weights on its disks (a cold start is mostly loading them), then one with disk
    room to fetch them, then the least loaded.

    ``order``, built over these same ``workers``, ``assignments`` and ``ledgers`` and kept
    up to date by the caller, finds the same worker without scanning them all; when none fits,
    every worker is still scanned for the reasons.
    """
    if order is not None:
        if (order.workers is not workers or order.assignments is not assignments
                or order.ledgers is not ledgers):
            raise ValueError("the worker order was built over other workers or assignments")
        local = order.with_weights.get(spec.model_name, [])
    else:
        local = [w for w in workers if w.has_weights(spec.model_name)]
    for tier in _weight_tiers(spec, workers, local):
        found = _least_loaded(spec, tier, assignments, ledgers, Refusal())
        if found is not None:
            return found
    if order is not None:
        found = order.first_fit(spec)
        if found is not None:
            return found
    refusal = Refusal()
    found = _least_loaded(spec, workers, assignments, ledgers, refusal)
    if found is not None:
        return found
    if spec.worker_id and not refusal.reasons:
        refusal.reasons.append(f"pinned worker '{spec.worker_id}' is not registered")
    if not workers:
        refusal.reasons.append("no workers registered")
    return refusal


def _weight_tiers(spec: ModelSpec, workers: list[WorkerView], local: list[WorkerView]
                  ) -> list[list[WorkerView]]:
    """The workers to try before the rest: ``local`` (those with the weights), then (where
    the model's size is known and some worker lacks the room) those with disk room."""
    tiers = [local] if local else []
    sizes = [m.size_mb for w in local for m in w.local_models if m.name == spec.model_name]
    size = max(sizes, default=spec.weights_mb or 0)
    if size:
        roomy = [w for w in workers if w.cache_free_mb is None or w.cache_free_mb >= size]
        if len(roomy) < len(workers):
            tiers.append(roomy)
    return tiers


def _least_loaded(
    spec: ModelSpec, workers: Sequence[WorkerView],
    assignments: Mapping[str, Mapping[str, Assignment]],
    ledgers: Mapping[str, Ledger] | None, refusal: Refusal,
) -> Choice | None:
    """The least loaded of ``workers`` that fits ``spec`` (ties by id); the others' reasons
    go to ``refusal``."""
    candidates: list[tuple[int, str, Choice]] = []
    for w in workers:
        if spec.worker_id and w.worker_id != spec.worker_id:
            continue
        mine = assignments.get(w.worker_id, {})
        reason = _unfit_reason(spec, w, mine)
        fit = reason or _fit_gpus(spec, w, (ledgers or {}).get(w.worker_id, {}))
        if isinstance(fit, str):
            refusal.reasons.append(fit)
        else:
            candidates.append((len(mine), w.worker_id, fit))
    return min(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None
