"""Typed settings, read from the environment once in each service's ``main`` and passed in.

Nothing reads the environment at import time; tests build their own settings objects.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.models import NAME_PATTERN


def _mem_total_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: "host:port,host:port,..." and the monitored primary's name. When set,
    # REDIS_URL is not used for the connection.
    redis_sentinels: str | None = None
    redis_sentinel_master: str = "mymaster"
    # Redis Cluster: some of its nodes, "host:port,host:port,..."; the client finds the rest.
    # When set, REDIS_URL and REDIS_SENTINELS are not used. docs/redis.md, "Redis Cluster".
    redis_cluster_nodes: str | None = None
    redis_prefix: str = Field(default="svllm", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    # Bearer token for /admin/* and the worker's control endpoints; unset = open.
    admin_token: str | None = None
    # Bearer token between services (router -> worker proxy, worker -> manager); unset = open.
    internal_token: str | None = None
    # A service bound to a non-loopback address refuses to start without its tokens, unless
    # this is set (then it warns once and /admin/status shows "insecure": true). docs/security.md
    allow_insecure: bool = False
    # Edge limits, on the fast lane and the ASGI path alike (shared/edge.py, docs/security.md).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    max_url_bytes: int = Field(default=8 * 1024, ge=256)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    # Open client connections per process; more get a 503 and are closed. The effective cap is
    # also kept to half the open-file limit (raised to its hard limit at start).
    max_connections: int = Field(default=8192, ge=1)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Pub/sub hints speed convergence; with them off every loop still converges on its timer.
    events_enabled: bool = True
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=6.0, gt=0)
    # The pool's heartbeats per second at most (0: no cap): past HEARTBEAT_MAX_PER_S x
    # HEARTBEAT_INTERVAL_S workers, each stretches its interval and TTL (shared/pace.py).
    heartbeat_max_per_s: float = Field(default=1000.0, ge=0)
    # The safety net of the incremental control plane: the scheduler makes a full pass, and
    # a worker re-reads its assignments, at least this often even when nothing says they
    # changed (a lost hint, a missed log entry).
    resync_s: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # Audio uploads (/v1/audio/*) are relayed as they arrive, not read whole: their own limit.
    max_audio_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # Engine sandboxing (checked at registration by routers, and again by workers at launch):
    # allow --trust-remote-code (and weight formats that unpickle), and the directories under
    # which local model paths and file arguments may point (comma-separated; empty = none).
    allow_trust_remote_code: bool = False
    model_roots: str = ""
    # Serve the hot requests below ASGI (shared/fastlane.py). Off: every request goes through
    # the ASGI app; same answers, about five times the CPU per request (docs/performance.md).
    fast_lane: bool = True
    # Python's cyclic garbage collector: objects made during start-up are frozen out of it and
    # a young-generation collection runs every this many allocations (Python's default is
    # 700). With 64 requests in flight, each collection walked their live frames and records:
    # the router's tail latency at c=64 doubled (docs/performance.md). 0 keeps Python's.
    gc_gen0_threshold: int = Field(default=20_000, ge=0)
    # Prometheus metrics and GET /metrics (docs/observability.md). Off: no /metrics and no
    # metric work on the request path (the bench's baseline for their cost).
    metrics: bool = True
    # Bearer token for GET /metrics (ADMIN_TOKEN works too); unset: ADMIN_TOKEN, or open.
    metrics_token: str | None = None
    # OTLP/HTTP collector (e.g. http://otel-collector:4318): router and worker send spans
    # there. Unset: no spans, and OpenTelemetry is not even imported (docs/observability.md).
    otel_exporter_otlp_endpoint: str | None = None


class RouterSettings(CommonSettings):
    router_host: str = "0.0.0.0"
    router_port: int = 8000
    # Bearer token for the OpenAI API (/v1/*); unset = open. A router on a non-loopback
    # address needs it, or API_OPEN=true to serve /v1 without one on purpose.
    api_token: str | None = None
    api_open: bool = False
    route_refresh_s: float = Field(default=1.0, gt=0)
    # Engine used when a registration names none. Choosing "sim" is explicit: it is logged
    # and shown as the model's engine everywhere.
    default_engine: Literal["vllm", "sim", "llamacpp", "sglang"] = "vllm"
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    no_replica_retry_after_s: int = 5
    # Failover: tries per request (on other replicas), and the pause before each retry.
    max_attempts: int = Field(default=3, ge=1, le=10)
    retry_backoff_s: float = Field(default=0.05, ge=0)
    # Circuit breaker: consecutive failures that eject a replica, and for how long.
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    # Non-streamed answers up to this size are read whole before they are sent on, so a
    # replica failing mid-answer costs nothing (failover); larger ones are relayed as they
    # arrive, with back-pressure, so a slow reader holds no more than this in the router.
    buffer_answer_max_bytes: int = Field(default=1 << 20, ge=0)
    router_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Requests held for a cold or sleeping model, per model across all routers; then 429.
    hold_queue_max: int = Field(default=256, ge=1)
    # A held streamed request gets an SSE comment this often, so proxies do not cut it.
    hold_keepalive_s: float = Field(default=5.0, gt=0)
    # Prefix-aware balancing: requests whose prompts share their first this many characters
    # go to one replica, so its engine's prefix cache serves them; 0 turns it off.
    prefix_affinity_chars: int = Field(default=256, ge=0)
    # ... unless that replica has more than this many requests more than the least loaded.
    prefix_affinity_slack: int = Field(default=4, ge=0)
    # Requests queued for a model at its max_inflight, per model and router; then 429
    # queue_full. A queued request waits at most QUEUE_TIMEOUT_S, then 503 queue_timeout.
    queue_max: int = Field(default=1024, ge=1)
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # How many routers share the pool: each takes max_inflight // ROUTER_COUNT of every
    # replica (at least 1), so together they stay within max_inflight (docs/queueing.md).
    # 0: the routers seen checking in within the last ROUTER_SEEN_TTL_S (10 s).
    router_count: int = Field(default=0, ge=0, le=1024)
    # Processes serving ROUTER_PORT (services/router/processes.py); 0: one per usable core.
    # 1: one process, no supervisor. Every process counts as a router (docs/performance.md).
    router_processes: int = Field(default=0, ge=0, le=1024)
    # Who may use /v1 (docs/keys.md): "auto" is "keys" once any API key exists, else "token"
    # with API_TOKEN set, else "open". "keys": API keys (and API_TOKEN, unlimited); "token":
    # API_TOKEN only; "open": anyone (a valid key still gets its limits).
    auth_mode: Literal["auto", "keys", "token", "open"] = "auto"
    # While Redis is unreachable: "allow" admits within a local share of each limit (the
    # limit divided by the routers last seen), "deny" refuses limited keys with a 503.
    limits_on_redis_down: Literal["allow", "deny"] = "allow"
    # Completion tokens reserved for a request that names no max_tokens.
    limits_default_max_tokens: int = Field(default=1024, ge=1)
    # The keys version check (safety net under the events channel), and how often token
    # corrections and usage counters are written (one pipeline per flush).
    keys_check_s: float = Field(default=0.5, gt=0)
    limits_flush_s: float = Field(default=0.1, gt=0)
    # A busy key's admission call also leases units spent on this router without Redis for
    # at most this long (docs/keys.md: its accuracy bound); 0: one call per request.
    limits_lease_s: float = Field(default=0.05, ge=0, le=1)
    # One structured log line per request (docs/observability.md): on/off, and the share of
    # requests logged (errors are always logged).
    access_log: bool = True
    access_log_sample: float = Field(default=1.0, ge=0, le=1)


class ManagerSettings(CommonSettings):
    manager_host: str = "0.0.0.0"
    manager_port: int = 9000
    manager_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-manager")
    # A tick acts on what changed since the last one (cheap: a few commands when nothing
    # did); a full pass runs every resync_s. Short, so a dead worker is acted on at once.
    schedule_interval_s: float = Field(default=0.1, gt=0)
    # Heartbeat keys are checked when due to expire (services/manager/liveness.py); every key
    # is checked at once this often too, which finds one deleted before its time.
    liveness_sweep_s: float = Field(default=1.0, gt=0)
    lease_ttl_s: float = Field(default=5.0, gt=0)
    # Autoscaling hysteresis: load must stay above (below) target this long to add (remove)
    # a replica.
    scale_out_s: float = Field(default=5.0, ge=0)
    scale_in_s: float = Field(default=60.0, ge=0)
    # Largest register/heartbeat body (413 beyond): a real worker's record is a few KB.
    worker_record_max_bytes: int = Field(default=256 * 1024, gt=0)
    # Records of a worker dead (no heartbeat) this long are deleted by the scheduler.
    worker_gc_grace_s: float = Field(default=600.0, gt=0)
    # A declarative models file (svllm apply's format) the scheduling manager applies at
    # start and on change; with models_file_prune, models not in it are deleted.
    models_file: Path | None = None
    models_file_prune: bool = False
    models_file_poll_s: float = Field(default=2.0, gt=0)
    # Engine for the file's entries that name none (the router's DEFAULT_ENGINE, for the file).
    default_engine: Literal["vllm", "sim", "llamacpp", "sglang"] = "vllm"


class WorkerSettings(CommonSettings):
    worker_id: str = Field(default_factory=socket.gethostname, pattern=NAME_PATTERN)
    worker_host: str = "0.0.0.0"
    worker_port: int = 7000
    # URL other services use to reach this worker; default http://<hostname>:<port>. Plain
    # http: routers speak HTTP/1.1 to workers (shared/wire.py); put TLS on the network layer.
    worker_url: str | None = Field(default=None, pattern=r"^http://[^/\s]+/?$")
    # When set, registration and heartbeats go through the manager's HTTP API.
    manager_url: str | None = None
    # "auto": sim always, vllm when its command is found. Or a comma list, e.g. "vllm".
    worker_engines: str = "auto"
    # How vLLM is launched, split on spaces: "vllm serve" or
    # "python -m vllm.entrypoints.openai.api_server"; "auto" picks whichever is installed.
    vllm_command: str = "auto"
    gpu_backend: Literal["nvml", "none", "fake"] = "nvml"
    # GPU_BACKEND=fake: a JSON list of GPUs (index, memory_total_mb, memory_used_mb, ...).
    fake_gpus: str = "[]"
    reconcile_interval_s: float = Field(default=1.0, gt=0)
    # "unix": engines that can (vLLM with --uds, the sim engine) serve on a Unix socket in a
    # directory only this worker's user can enter; "tcp": every engine on a loopback port.
    engine_sockets: Literal["unix", "tcp"] = "unix"
    engine_start_timeout_s: float = Field(default=900.0, gt=0)
    engine_stop_grace_s: float = Field(default=15.0, gt=0)
    engine_retry_base_s: float = Field(default=5.0, gt=0)
    engine_retry_max_s: float = Field(default=300.0, gt=0)
    # Health of RUNNING engines: checked this often; the first failure withdraws the route,
    # this many in a row fail the instance (restarted with the retry back-off).
    engine_health_interval_s: float = Field(default=2.0, gt=0)
    engine_health_failures: int = Field(default=3, ge=1)
    state_dir: Path = Path("/tmp/svllm")
    # Host RAM that level-1 sleeping instances may hold (their weights); default: half of RAM.
    sleep_ram_budget_mb: int | None = Field(default=None, ge=0)
    # The most engines without GPUs (on a worker without GPUs: every engine) this worker
    # runs at once; reported in its record, and the scheduler places no more.
    max_cpu_engines: int = Field(default=8, ge=0, le=1024)
    # Environment variables engines may see beyond the built-in allowlist: comma-separated
    # names, or prefixes ending in '*' (services/worker/engines/environment.py). The pool's
    # tokens and Redis URL never pass.
    engine_env_passthrough: str = ""
    # Where model weights are cached (the Hugging Face hub layout); the same variables
    # huggingface_hub and vLLM read: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
    hf_hub_cache: Path | None = None
    hf_home: Path | None = None
    # A local mirror prefetches copy from (<dir>/<org>/<name>) instead of the hub.
    prefetch_source_dir: Path | None = None
    # How often the worker re-reads which weights it has (a walk of the cache and MODEL_ROOTS).
    weights_scan_interval_s: float = Field(default=30.0, gt=0)

    def sleep_ram_budget(self) -> int:
        if self.sleep_ram_budget_mb is not None:
            return self.sleep_ram_budget_mb
        return _mem_total_mb() // 2

    def advertised_url(self) -> str:
        if self.worker_url:
            return self.worker_url.rstrip("/")
        host = self.worker_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.worker_port}"
