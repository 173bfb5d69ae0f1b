"""Engine drivers by name."""

from __future__ import annotations

from pathlib import Path

from services.worker.engines.base import EngineDriver
from services.worker.engines.llamacpp import LlamaCppDriver
from services.worker.engines.sglang import SglangDriver
from services.worker.engines.sim import SimDriver
from services.worker.engines.vllm import VllmDriver


def available_drivers(
    engines_setting: str, vllm_command: str, probe_log: Path | None = None,
    env_passthrough: tuple[str, ...] = (),
) -> dict[str, EngineDriver]:
    """The drivers this worker advertises. 'auto': sim always, vllm when it is installed.

    A named engine that cannot run here is an error at start-up, not a silent omission.
    ``probe_log``: where vLLM's flag reading writes its output (None: no reading).
    """
    all_drivers: dict[str, EngineDriver] = {
        "sim": SimDriver(), "vllm": VllmDriver(vllm_command, probe_log, env_passthrough),
        "llamacpp": LlamaCppDriver(), "sglang": SglangDriver(),
    }
    if engines_setting == "auto":
        return {n: d for n, d in all_drivers.items() if d.unavailable_reason() is None}
    out: dict[str, EngineDriver] = {}
    for name in (n.strip() for n in engines_setting.split(",") if n.strip()):
        driver = all_drivers.get(name)
        if driver is None:
            raise ValueError(f"WORKER_ENGINES names unknown engine {name!r}")
        reason = driver.unavailable_reason()
        if reason:
            raise ValueError(f"WORKER_ENGINES names {name!r} but {reason}")
        out[name] = driver
    return out
