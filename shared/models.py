"""Typed records that cross process boundaries (HTTP bodies and Redis values)."""

from __future__ import annotations

import re
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.engine_args import (
    ENGINES,
    SLEEP_ENGINES,
    ExtraArgsError,
    has_path_escape,
    normalize_extra_args,
)
from shared.engine_policy import Sandbox, check_sandbox

# Aliases and worker ids become Redis key parts and URL path segments: no ':' '/' or spaces,
# and they start with a letter or digit so they can never read as a command-line flag.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./+=@-]{0,511}$")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def is_valid_name(value: str) -> bool:
    return bool(_NAME_RE.fullmatch(value))


# Starts a placement reason that refuses an operator's manual placement only: held requests do
# not fail on it (the scheduler's own replicas may still serve the alias).
MANUAL_REFUSED = "manual placement refused"

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InstanceState(StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    WARMING = "WARMING"
    RUNNING = "RUNNING"
    SLEEPING = "SLEEPING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


class ModelSpec(Strict):
    """What an operator asks for: the desired state of one alias."""

    alias: Name
    model_name: str = Field(min_length=1, max_length=512)
    engine: Literal["vllm", "sim", "llamacpp", "sglang"]
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    # Absolute GPU memory per GPU to reserve, instead of a fraction of the GPU's total.
    gpu_memory_mb: int | None = Field(default=None, ge=64, le=10_000_000)
    max_model_len: int | None = Field(default=None, ge=16, le=10_000_000)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    replicas: int = Field(default=1, ge=1, le=64)
    # Autoscaling: with target_inflight set, the replica count follows the outstanding
    # requests (target per replica), between max(min_replicas, 1) and max_replicas.
    max_replicas: int | None = Field(default=None, ge=1, le=64)
    target_inflight: float | None = Field(default=None, gt=0, le=100_000)
    # Requests one replica takes at once; past that on every replica, routers queue them
    # (fair share and priorities: docs/queueing.md). None: no cap.
    max_inflight: int | None = Field(default=None, ge=1, le=100_000)
    worker_id: Name | None = None
    extra_args: list[str] = Field(default_factory=list, max_length=64)
    # Residency: how many replicas stay when idle (0 = scale to zero), when to sleep and stop.
    min_replicas: int = Field(default=1, ge=0, le=64)
    idle_sleep_s: float | None = Field(default=None, gt=0, le=30 * 86400)
    sleep_level: Literal[1, 2] = 1
    idle_stop_s: float | None = Field(default=None, gt=0, le=30 * 86400)
    cold_start_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    # Host RAM a level-1 sleep needs (weights offloaded); default: size of a local model dir.
    weights_mb: int | None = Field(default=None, ge=0, le=10_000_000)

    @property
    def sleep_mode(self) -> bool:
        """Engines start with sleep mode only when the policy can put them to sleep."""
        return self.idle_sleep_s is not None

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if v.startswith("-"):
            raise ValueError("model_name must not start with '-'")
        if has_path_escape(v):
            raise ValueError("model_name must not contain a '..' segment")
        if not _MODEL_NAME_RE.fullmatch(v):
            raise ValueError(
                "model_name must be a hub id (org/name) or a local path of letters, digits "
                "and ._/+=@-"
            )
        return v

    @model_validator(mode="after")
    def _extra_args(self) -> ModelSpec:
        try:
            self.extra_args = normalize_extra_args(self.engine, self.extra_args)
        except ExtraArgsError as e:
            raise ValueError(str(e)) from e
        if self.engine == "llamacpp" and not self.model_name.endswith(".gguf"):
            raise ValueError("engine 'llamacpp' serves a local .gguf file: model_name must be "
                             "its path")
        if self.sleep_mode and self.engine not in SLEEP_ENGINES:
            raise ValueError(f"engine '{self.engine}' has no sleep mode: drop idle_sleep_s "
                             "(idle_stop_s still scales it to zero)")
        if self.gpu_memory_mb is not None and self.gpu_memory_utilization is not None:
            raise ValueError("give gpu_memory_mb or gpu_memory_utilization, not both")
        if self.min_replicas > self.replicas:
            raise ValueError("min_replicas must not exceed replicas")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError("max_replicas must not be below replicas")
        if self.idle_stop_s is not None and self.min_replicas > 0:
            raise ValueError("idle_stop_s needs min_replicas 0 (min_replicas >= 1 stays resident)")
        if (self.idle_sleep_s is not None and self.idle_stop_s is not None
                and self.idle_stop_s <= self.idle_sleep_s):
            raise ValueError("idle_stop_s must be longer than idle_sleep_s")
        return self


class RegisterModelRequest(Strict):
    """Body of ``POST /admin/models/register``; ``engine`` falls back to DEFAULT_ENGINE."""

    alias: Name
    model_name: str
    engine: str | None = None
    gpu_memory_utilization: float | None = None
    gpu_memory_mb: int | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    replicas: int = 1
    max_replicas: int | None = None
    target_inflight: float | None = None
    max_inflight: int | None = None
    worker_id: Name | None = None
    extra_args: list[str] = Field(default_factory=list)
    min_replicas: int = 1
    idle_sleep_s: float | None = None
    sleep_level: int = 1
    idle_stop_s: float | None = None
    cold_start_timeout_s: float = 300.0
    weights_mb: int | None = None

    def to_spec(self, default_engine: str, sandbox: Sandbox | None = None) -> ModelSpec:
        """The validated spec; also checked against the operator's ``sandbox`` (the strict
        default when None): raises ValueError (PolicyError) naming the setting to change."""
        data = self.model_dump()
        data["engine"] = self.engine or default_engine
        if data["engine"] not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        spec = ModelSpec.model_validate(data)
        check_sandbox(spec.engine, spec.model_name, spec.extra_args, sandbox or Sandbox())
        return spec


class GpuProcess(BaseModel):
    pid: int = Field(ge=0)
    used_mb: int = Field(default=0, ge=0)
    ours: bool = False  # one of this worker's engines


class GpuInfo(BaseModel):
    index: int = Field(ge=0, lt=1024)
    uuid: str = ""
    name: str = ""
    memory_total_mb: int = Field(default=0, ge=0)
    memory_used_mb: int = Field(default=0, ge=0)
    memory_free_mb: int = Field(default=0, ge=0)
    utilization_pct: int | None = Field(default=None, ge=0, le=100)
    processes: list[GpuProcess] = Field(default_factory=list)
    # Memory held by processes that are not this worker's engines (None: not known).
    foreign_used_mb: int | None = None


class Reservation(BaseModel):
    """A ledger entry: GPU memory held for one instance until its engine is confirmed gone."""

    alias: str
    gpus: list[int]
    mb_per_gpu: int
    epoch: int = 0


# Bounds of a worker's record (register and heartbeat bodies, and what a worker writes to
# Redis itself): every scheduler pass and /admin/status read every record, so one worker
# must not be able to make them slow (seven 4.5 MB records once cut passes from 20 to 3 per
# 20 s). A real worker stays far inside them: it caps its own report with cap_gpus.
MAX_GPUS = 64
MAX_GPU_PROCESSES = 64
MAX_GPU_TEXT = 128  # a GPU's uuid and name
MAX_MESSAGE = 1024  # gpu_message
MAX_LOAD_KEYS = 64

MAX_LOCAL_MODELS = 256


class LocalModel(BaseModel):
    """Model weights a worker has on its disks: a Hugging Face cache entry (``name`` is the
    hub id) or a directory under MODEL_ROOTS (``name`` is its absolute path)."""

    name: str = Field(min_length=1, max_length=512)
    size_mb: int = Field(default=0, ge=0)
    source: Literal["hf_cache", "model_root"] = "hf_cache"


EngineName = Annotated[str, Field(min_length=1, max_length=32)]
LoadKey = Annotated[str, Field(min_length=1, max_length=128)]


def _check_gpus(gpus: list[GpuInfo] | None) -> None:
    """Bounds that GpuInfo itself does not carry (the worker builds it from NVML, then caps
    it): raised with the field's path, for the 400 that names it."""
    for i, g in enumerate(gpus or ()):
        where = f"gpus.{i}"
        if len(g.processes) > MAX_GPU_PROCESSES:
            raise ValueError(f"{where}.processes: at most {MAX_GPU_PROCESSES} entries "
                             f"(got {len(g.processes)})")
        for name in ("uuid", "name"):
            if len(getattr(g, name)) > MAX_GPU_TEXT:
                raise ValueError(f"{where}.{name}: at most {MAX_GPU_TEXT} characters")


def cap_gpus(gpus: list[GpuInfo], message: str) -> tuple[list[GpuInfo], str]:
    """A worker's own GPU report within the record bounds: the first MAX_GPUS GPUs, the
    largest processes (this worker's engines first) and truncated texts. Memory sums such as
    ``foreign_used_mb`` were computed before, from every process."""
    out = []
    for g in gpus[:MAX_GPUS]:
        procs = sorted(g.processes, key=lambda p: (not p.ours, -p.used_mb))
        out.append(g.model_copy(update={"processes": procs[:MAX_GPU_PROCESSES],
                                        "uuid": g.uuid[:MAX_GPU_TEXT],
                                        "name": g.name[:MAX_GPU_TEXT]}))
    return out, message[:MAX_MESSAGE]


class WorkerRegistration(Strict):
    """What a worker says about itself: on register, and refreshed by each heartbeat."""

    worker_id: Name
    url: str = Field(min_length=1, max_length=512, pattern=r"^https?://[^\s]+$")
    engines: list[EngineName] = Field(default_factory=list, max_length=16)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=MAX_GPUS)
    gpu_message: str = Field(default="", max_length=MAX_MESSAGE)
    version: str = Field(default="", max_length=64)
    # The most engines without GPUs the worker runs at once (MAX_CPU_ENGINES); None: no cap
    # reported (a worker from before the setting).
    max_cpu_engines: int | None = Field(default=None, ge=0, le=1024)

    @model_validator(mode="after")
    def _bounded(self) -> WorkerRegistration:
        _check_gpus(self.gpus)
        return self


class Heartbeat(Strict):
    gpus: list[GpuInfo] | None = Field(default=None, max_length=MAX_GPUS)
    gpu_message: str | None = Field(default=None, max_length=MAX_MESSAGE)
    # None (as for every field here): unchanged since the worker's last beat.
    load: dict[LoadKey, float] | None = Field(default=None, max_length=MAX_LOAD_KEYS)
    # Weights on the worker's disks (None: not scanned yet), and room left for more.
    local_models: list[LocalModel] | None = Field(default=None, max_length=MAX_LOCAL_MODELS)
    cache_free_mb: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> Heartbeat:
        _check_gpus(self.gpus)
        return self


class Assignment(BaseModel):
    """The scheduler's decision that ``worker_id`` runs ``alias`` (source "manual": carrying
    out an operator's request for a manual placement)."""

    alias: str
    worker_id: str
    epoch: int = 0
    source: Literal["scheduler", "manual"] = "scheduler"
    # What the engine should be doing: serving, or asleep at the spec's sleep level.
    target: Literal["running", "sleeping"] = "running"
    gpus: list[int] = Field(default_factory=list)
    mb_per_gpu: int = 0
    # Computed from the reservation: what the engine is told it may use of each GPU.
    gpu_memory_utilization: float | None = None
    spec_version: str = ""
    assigned_at: float = Field(default_factory=time.time)


class ManualStartRequest(Strict):
    """Body of a worker's ``POST /instances/start``: the alias must be registered."""

    alias: Name


class WorkerView(BaseModel):
    """A worker as the scheduler sees it: registration plus liveness."""

    worker_id: str
    url: str = ""
    alive: bool = False
    engines: list[str] = Field(default_factory=list)
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_message: str = ""
    version: str = ""
    # The installed vLLM's version, once the worker has read its argument parser.
    vllm_version: str = ""
    registered_at: float = 0.0
    last_seen: float = 0.0
    load: dict[str, Any] = Field(default_factory=dict)
    max_cpu_engines: int | None = None
    local_models: list[LocalModel] = Field(default_factory=list)
    cache_free_mb: int | None = None

    def has_weights(self, model_name: str) -> bool:
        return any(m.name == model_name for m in self.local_models)


class PrefetchRequest(Strict):
    """Body of ``POST /admin/models/{alias}/prefetch`` (optional): the workers to download
    the weights to; default every live worker that can run the model and lacks them."""

    workers: list[Name] | None = Field(default=None, min_length=1, max_length=256)


# --- LoRA adapters ------------------------------------------------------------------------

MAX_ADAPTERS_PER_ENGINE = 1024


class AdapterSpec(Strict):
    """A LoRA adapter served as its own alias (``POST /admin/adapters``): requests for
    ``alias`` go to a replica of ``base`` with the adapter loaded there on demand. The engine
    serves it under the alias itself (vLLM's ``lora_name``), so request bodies pass unchanged."""

    alias: Name
    base: Name
    # A hub id (org/name) or a local directory (under MODEL_ROOTS), as a model_name.
    adapter: str = Field(min_length=1, max_length=512)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str) -> str:
        if v.startswith("-") or has_path_escape(v) or not _MODEL_NAME_RE.fullmatch(v):
            raise ValueError("adapter must be a hub id (org/name) or a local path of letters, "
                             "digits and ._/+=@- without a '..' segment")
        return v


def lora_capacity(spec: ModelSpec) -> int | None:
    """How many adapters one engine of ``spec`` holds at once: its ``--max-loras`` (vLLM's
    default 1), or None when it was not started with ``--enable-lora``."""
    args = spec.extra_args
    if "--enable-lora" not in args:
        return None
    if "--max-loras" in args:
        i = args.index("--max-loras")
        return max(1, min(MAX_ADAPTERS_PER_ENGINE, int(float(args[i + 1]))))
    return 1
