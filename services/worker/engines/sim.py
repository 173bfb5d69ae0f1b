"""The simulated engine: the project's own vLLM look-alike, run as a subprocess."""

from __future__ import annotations

import sys

from services.worker.engines.base import Launch
from shared.models import Assignment, ModelSpec


class SimDriver:
    name = "sim"

    async def prepare(self) -> None:
        return None

    def unavailable_reason(self) -> str | None:
        return None

    def unix_socket(self) -> bool:
        return True

    def launch(self, spec: ModelSpec, port: int, placed: Assignment,
               uds: str | None = None) -> Launch:
        argv = [
            sys.executable, "-m", "services.sim_engine",
            "--model", spec.model_name,
            "--served-model-name", spec.alias,
            *(["--uds", uds] if uds else ["--host", "127.0.0.1", "--port", str(port)]),
        ]
        util = placed.gpu_memory_utilization or spec.gpu_memory_utilization
        if util is not None:
            argv += ["--gpu-memory-utilization", f"{util:g}"]
        if spec.max_model_len is not None:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.sleep_mode and "--enable-sleep-mode" not in spec.extra_args:
            argv.append("--enable-sleep-mode")
        return Launch(argv + spec.extra_args, {})
