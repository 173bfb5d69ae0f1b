"""GPU inventory behind a small interface: NVML when present, an explicit 'no GPU' otherwise."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import pynvml  # nvidia-ml-py: imports everywhere; nvmlInit fails where there is no driver

from shared.models import GpuInfo

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class GpuInventory(Protocol):
    def read(self) -> tuple[list[GpuInfo], str]:
        """The GPUs now, and a human-readable note ('' when all is well)."""


class NoGpu:
    def __init__(self, why: str) -> None:
        self.why = why

    def read(self) -> tuple[list[GpuInfo], str]:
        return [], self.why


class NvmlInventory:
    """Reads memory and utilisation per GPU through pynvml (nvidia-ml-py)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

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
        )

    def read(self) -> tuple[list[GpuInfo], str]:
        try:
            count = self.nvml.nvmlDeviceGetCount()
            gpus = [self._one(i) for i in range(count)]
        except self.nvml.NVMLError as e:
            return [], f"NVML error while reading GPUs: {e}"
        return gpus, "" if gpus else "no GPU: NVML found no devices"


def open_inventory(backend: str) -> GpuInventory:
    """The inventory for a worker; never raises: a machine without GPUs gets :class:`NoGpu`."""
    if backend == "none":
        return NoGpu("no GPU: GPU detection disabled (GPU_BACKEND=none)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return NoGpu(f"no GPU: NVML unavailable ({e})")
    return NvmlInventory(pynvml)
