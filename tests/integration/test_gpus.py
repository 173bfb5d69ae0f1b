"""GPU packing with a fake inventory, release after exit, and no orphan after a worker crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from shared import procs
from tests.support import Cluster, model_status, register, running_on, status, wait_until

GPU = {"index": 0, "uuid": "GPU-fake-0", "name": "Fake H100", "memory_total_mb": 81920,
       "memory_used_mb": 2048}
FAKE = {"GPU_BACKEND": "fake", "FAKE_GPUS": json.dumps([GPU]), "WORKER_ENGINES": "sim"}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def placement(router, alias: str) -> str | None:
    m = model_status(router, alias)
    return m["placement"] if m else None


def test_two_models_packed_on_one_gpu_third_refused_then_placed(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("gpu1", **FAKE)
    router = cluster.router()
    assert register(router, "m1", engine="sim", gpu_memory_mb=30000).status_code == 201
    assert register(router, "m2", engine="sim", gpu_memory_utilization=0.5).status_code == 201
    wait_until(lambda: running_on(router, "m1") and running_on(router, "m2"), 20,
               what="m1 and m2 running")
    utils = {}
    for alias in ("m1", "m2"):
        inst = model_status(router, alias)["instances"][0]  # type: ignore[index]
        assert inst["gpus"] == "0"
        argv = cmdline(int(inst["pid"]))
        utils[alias] = argv[argv.index("--gpu-memory-utilization") + 1]
    # 30000/81920 floored to 3 places; 0.5 of the GPU.
    assert utils == {"m1": "0.366", "m2": "0.5"}

    def gpu_view() -> dict[str, Any] | None:
        (w,) = status(router)["workers"]
        return w["gpus"][0] if len(w["gpus"][0]["processes"]) == 3 else None

    g = wait_until(gpu_view, 10, what="engines on the GPU")
    assert g["foreign_used_mb"] == 2048
    # The ledger's reservations of GPU 0, as `svllm status` and the console show them.
    assert status(router)["workers"][0]["gpu_reserved_mb"] == {"0": 30000 + 40960}
    assert sorted(p["ours"] for p in g["processes"]) == [False, True, True]

    # 81920 - 30000 - 40960 - 2048 = 8912 MB left: a 10000 MB model does not fit.
    assert register(router, "m3", engine="sim", gpu_memory_mb=10000).status_code == 201
    reason = wait_until(lambda: placement(router, "m3"), 10, what="m3 refused")
    assert "needs 1 GPU(s) with 10000 MB free" in reason and "8912 MB" in reason
    assert running_on(router, "m3") == []

    m1_pid = int(model_status(router, "m1")["instances"][0]["pid"])  # type: ignore[index]
    assert httpx.delete(f"{router.url}/admin/models/m1").status_code == 200
    # The reservation is released only once m1's engine is gone; then m3 fits.
    wait_until(lambda: running_on(router, "m3") == ["gpu1"], 20, what="m3 placed after m1")
    assert not procs.group_alive(m1_pid)
