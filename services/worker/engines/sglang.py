"""SGLang: `python -m sglang.launch_server`, when sglang is importable on the worker."""

from __future__ import annotations

import importlib.util
import sys

from services.worker.engines.base import Launch
from services.worker.engines.vllm import cuda_env
from shared.models import Assignment, ModelSpec


def build_sglang_args(spec: ModelSpec, port: int, gpu_util: float | None) -> list[str]:
    argv = [sys.executable, "-m", "sglang.launch_server",
            "--model-path", spec.model_name, "--served-model-name", spec.alias,
            "--host", "127.0.0.1", "--port", str(port),
            "--tp", str(spec.tensor_parallel_size)]
    util = gpu_util if gpu_util is not None else spec.gpu_memory_utilization
    if util is not None:
        # SGLang's static share of GPU memory (weights + KV cache), like vLLM's utilisation.
        argv += ["--mem-fraction-static", f"{util:g}"]
    if spec.max_model_len is not None:
        argv += ["--context-length", str(spec.max_model_len)]
    return argv + spec.extra_args


class SglangDriver:
    name = "sglang"

    async def prepare(self) -> None:
        return None

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return "SGLang is not installed (no importable sglang module)"
        return None

    def unix_socket(self) -> bool:
        return False  # SGLang serve on host:port only

    def launch(self, spec: ModelSpec, port: int, placed: Assignment,
               uds: str | None = None) -> Launch:
        if uds is not None:
            raise RuntimeError("SGLang cannot serve on a Unix socket")
        argv = build_sglang_args(spec, port, placed.gpu_memory_utilization)
        return Launch(argv, cuda_env(placed.gpus))
