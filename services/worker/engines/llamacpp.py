"""GGUF models through llama.cpp's OpenAI-compatible server: the `llama-server` binary, or
llama-cpp-python's `python -m llama_cpp.server`, whichever is installed (binary first)."""

from __future__ import annotations

import importlib.util
import shutil
import sys

from services.worker.engines.base import Launch
from shared.models import Assignment, ModelSpec


def build_llama_server_args(binary: str, spec: ModelSpec, port: int, gpus: list[int]) -> list[str]:
    argv = [binary, "--model", spec.model_name, "--alias", spec.alias,
            "--host", "127.0.0.1", "--port", str(port),
            # All layers on the GPU when one is assigned; none otherwise.
            "--n-gpu-layers", "999" if gpus else "0"]
    if spec.max_model_len is not None:
        argv += ["--ctx-size", str(spec.max_model_len)]
    return argv + spec.extra_args


# llama-server's flag -> llama-cpp-python's spelling (and, for switches, the value it needs).
_PY_FLAGS: dict[str, tuple[str, str | None]] = {
    "--threads": ("--n_threads", None),
    "--batch-size": ("--n_batch", None),
    "--n-gpu-layers": ("--n_gpu_layers", None),
    "--seed": ("--seed", None),
    "--flash-attn": ("--flash_attn", "true"),
    "--mlock": ("--use_mlock", "true"),
}


def translate_for_python_server(extra: list[str]) -> list[str]:
    """``extra_args`` (llama-server's flags) in llama_cpp.server's spelling; a flag it has no
    equivalent for raises ValueError, naming it."""
    out: list[str] = []
    i = 0
    while i < len(extra):
        flag = extra[i]
        if flag not in _PY_FLAGS:
            raise ValueError(f"{flag} has no equivalent in llama-cpp-python's server; install "
                             "the llama-server binary on this worker or drop the flag")
        name, switch_value = _PY_FLAGS[flag]
        if switch_value is not None:
            out += [name, switch_value]
            i += 1
        else:
            out += [name, extra[i + 1]]
            i += 2
    return out


def build_llama_cpp_python_args(spec: ModelSpec, port: int, gpus: list[int]) -> list[str]:
    extra = translate_for_python_server(spec.extra_args)
    layers = "-1" if gpus else "0"
    if "--n_gpu_layers" in extra:  # the spec's own choice replaces the default
        layers = extra.pop(extra.index("--n_gpu_layers") + 1)
        extra.remove("--n_gpu_layers")
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", spec.model_name,
            "--model_alias", spec.alias, "--host", "127.0.0.1", "--port", str(port),
            "--n_gpu_layers", layers]
    if spec.max_model_len is not None:
        argv += ["--n_ctx", str(spec.max_model_len)]
    return argv + extra


class LlamaCppDriver:
    name = "llamacpp"

    async def prepare(self) -> None:
        return None

    def __init__(self) -> None:
        self.binary = shutil.which("llama-server")
        self.module = importlib.util.find_spec("llama_cpp") is not None

    def unavailable_reason(self) -> str | None:
        if self.binary or self.module:
            return None
        return "llama.cpp is not installed (no `llama-server` on PATH, no llama_cpp module)"

    def unix_socket(self) -> bool:
        return False  # llama.cpp's servers serve on host:port only

    def launch(self, spec: ModelSpec, port: int, placed: Assignment,
               uds: str | None = None) -> Launch:
        if uds is not None:
            raise RuntimeError("llama.cpp's servers cannot serve on a Unix socket")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, placed.gpus))} if placed.gpus else {}
        if self.binary:
            return Launch(build_llama_server_args(self.binary, spec, port, placed.gpus), env)
        if self.module:
            # llama-cpp-python's server has no /health; /v1/models answers once loaded.
            try:
                argv = build_llama_cpp_python_args(spec, port, placed.gpus)
            except ValueError as e:
                raise RuntimeError(str(e)) from e
            return Launch(argv, env, health_path="/v1/models", uuid_request_ids=True)
        raise RuntimeError(self.unavailable_reason())
