"""GPU inventory behind a small interface: NVML when present, an explicit 'no GPU' otherwise,
and a fake for tests and demos. :func:`account` marks which GPU memory is this worker's."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import pynvml  # nvidia-ml-py: imports everywhere; nvmlInit fails where there is no driver
from pydantic import TypeAdapter, ValidationError

from shared.models import GpuInfo, GpuProcess

logger = logging.getLogger(__name__)

_MB = 1024 * 1024

# (pid, GPU index, MB reserved) of each live engine of this worker.
EngineUse = tuple[int, int, int]


class GpuInventory(Protocol):
    def read(self) -> tuple[list[GpuInfo], str]:
        """The GPUs now, and a human-readable note ('' when all is well)."""


class NoGpu:
    def __init__(self, why: str) -> None:
        self.why = why

    def read(self) -> tuple[list[GpuInfo], str]:
        return [], self.why


class NvmlInventory:
    """Reads memory, utilisation and compute processes per GPU through pynvml."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def _processes(self, handle: Any) -> list[GpuProcess]:
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self.nvml.NVMLError:
            return []
        # usedGpuMemory is None where the driver will not say (e.g. in some containers).
        return [GpuProcess(pid=int(p.pid), used_mb=int(p.usedGpuMemory or 0) // _MB)
                for p in procs]

    def _one(self, index: int) -> GpuInfo:
        n = self.nvml
        h = n.nvmlDeviceGetHandleByIndex(index)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        try:
            util: int | None = int(n.nvmlDeviceGetUtilizationRates(h).gpu)
        except n.NVMLError:
            util = None
        name = n.nvmlDeviceGetName(h)
        uuid = n.nvmlDeviceGetUUID(h)
        return GpuInfo(
            index=index,
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            name=name.decode() if isinstance(name, bytes) else str(name),
            memory_total_mb=int(mem.total) // _MB,
            memory_used_mb=int(mem.used) // _MB,
            memory_free_mb=int(mem.free) // _MB,
            utilization_pct=util,
            processes=self._processes(h),
        )

    def read(self) -> tuple[list[GpuInfo], str]:
        try:
            count = self.nvml.nvmlDeviceGetCount()
            gpus = [self._one(i) for i in range(count)]
        except self.nvml.NVMLError as e:
            return [], f"NVML error while reading GPUs: {e}"
        return gpus, "" if gpus else "no GPU: NVML found no devices"


class FakeInventory:
    """GPUs described in JSON (``FAKE_GPUS``), for tests and demos without a GPU.

    ``memory_used_mb`` in the description is memory of some other process (reported as one
    foreign process); each live engine of this worker adds its reservation, as a real engine
    would, so the worker's accounting runs the same code as with NVML.
    """

    def __init__(self, gpus: list[GpuInfo], engines: Callable[[], Iterable[EngineUse]]) -> None:
        self.base = gpus
        self.engines = engines

    def read(self) -> tuple[list[GpuInfo], str]:
        out = []
        uses = list(self.engines())
        for g in self.base:
            procs = [GpuProcess(pid=1, used_mb=g.memory_used_mb)] if g.memory_used_mb else []
            procs += [GpuProcess(pid=pid, used_mb=mb) for pid, idx, mb in uses if idx == g.index]
            used = sum(p.used_mb for p in procs)
            out.append(g.model_copy(update={
                "memory_used_mb": used, "memory_free_mb": max(0, g.memory_total_mb - used),
                "processes": procs}))
        return out, "fake GPUs (GPU_BACKEND=fake)"


def account(
    gpus: list[GpuInfo], own_pgids: set[int], own_reserved: dict[int, int]
) -> list[GpuInfo]:
    """Mark the processes that belong to this worker's engines (by process group) and sum the
    memory of the others: the scheduler must leave that memory alone. Without a process list,
    what is used beyond this worker's live reservations counts as foreign."""
    out = []
    for g in gpus:
        procs = [p.model_copy(update={"ours": _pgid(p.pid) in own_pgids}) for p in g.processes]
        if procs:
            foreign = sum(p.used_mb for p in procs if not p.ours)
        else:
            foreign = max(0, g.memory_used_mb - own_reserved.get(g.index, 0))
        out.append(g.model_copy(update={"processes": procs, "foreign_used_mb": foreign}))
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def open_inventory(
    backend: str, fake_gpus: str = "[]", engines: Callable[[], Iterable[EngineUse]] = list
) -> GpuInventory:
    """The inventory for a worker; never raises: a machine without GPUs gets :class:`NoGpu`."""
    if backend == "none":
        return NoGpu("no GPU: GPU detection disabled (GPU_BACKEND=none)")
    if backend == "fake":
        try:
            gpus = TypeAdapter(list[GpuInfo]).validate_json(fake_gpus)
        except ValidationError as e:
            raise ValueError(f"FAKE_GPUS is not a JSON list of GPUs: {e}") from e
        return FakeInventory(gpus, engines)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return NoGpu(f"no GPU: NVML unavailable ({e})")
    return NvmlInventory(pynvml)
