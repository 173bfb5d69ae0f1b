"""The environment an engine gets: an allowlist of the worker's, never the pool's secrets.

An engine runs code that comes with a model (tokenizer templates, and with
``--trust-remote-code`` Python), so it must not see the pool's credentials: the admin and
internal tokens, or the Redis URL (which may carry a password). What engines need passes:
locale, paths, temporary directories, and the variables of CUDA, NVIDIA, vLLM, Hugging Face,
PyTorch and the like. ``ENGINE_ENV_PASSTHROUGH`` names more (exact names, or prefixes ending
in ``*``). ``HF_TOKEN`` passes with the ``HF_`` family: gated models need it; a worker that
must not hand it to engines should not have it in its own environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ENGINE_ENV_NAMES: frozenset[str] = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
    "TMPDIR", "TMP", "TEMP", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "DO_NOT_TRACK",
})
ENGINE_ENV_PREFIXES: tuple[str, ...] = (
    "LC_", "XDG_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_", "CUDNN_", "HIP_", "ROCM_",
    "HSA_", "VLLM_", "SGLANG_", "LLAMA_", "GGML_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
    "TOKENIZERS_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "TRITON_", "OMP_", "MKL_", "KMP_",
    "OPENBLAS_",
)
# The pool's own credentials: never passed, whatever the allowlist or the passthrough says.
POOL_SECRETS: frozenset[str] = frozenset({
    "ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN", "REDIS_URL", "REDIS_SENTINELS", "REDIS_PASSWORD",
})


def parse_passthrough(setting: str) -> tuple[str, ...]:
    """ENGINE_ENV_PASSTHROUGH ("NAME,PREFIX_*,...") as a tuple of names and prefixes."""
    return tuple(n.strip() for n in setting.split(",") if n.strip())


def _passes(name: str, extra: Iterable[str]) -> bool:
    if name in POOL_SECRETS:
        return False
    if name in ENGINE_ENV_NAMES or name.startswith(ENGINE_ENV_PREFIXES):
        return True
    return any(name.startswith(e[:-1]) if e.endswith("*") else name == e for e in extra)


def engine_env(
    worker_env: Mapping[str, str], launch_env: Mapping[str, str], extra: Iterable[str] = ()
) -> dict[str, str]:
    """The allowlisted part of ``worker_env`` plus the launch's own variables."""
    names = tuple(extra)
    out = {k: v for k, v in worker_env.items() if _passes(k, names)}
    out.update({k: v for k, v in launch_env.items() if k not in POOL_SECRETS})
    return out
