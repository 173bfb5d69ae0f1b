"""The worker's metrics (docs/observability.md): engine life-cycle counters and durations,
stamped by the flows; instance states and GPU memory, read at scrape time; and the engines'
own metrics, re-exported with ``model`` and ``worker`` labels on ``GET /metrics/engines``.

Nothing here is on the request path: the proxy records no metric per request (the router
does), so metrics cost the worker's hot path nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from services.worker.engines.base import EngineProcess
from shared.metrics import SLOW_BUCKETS, FuncCollector
from shared.models import GpuInfo, InstanceState

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_ENGINE_SCRAPE_TIMEOUT_S = 2.0


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, worker_id: str) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.starts = Counter("svllm_worker_engine_starts", "Engine starts, first or again.",
                              ["model", "engine"], registry=registry)
        self.restarts = Counter(
            "svllm_worker_engine_restarts", "Engine starts after a failure of the same instance.",
            ["model", "engine"], registry=registry)
        self.failures = Counter("svllm_worker_engine_failures",
                                "Instances that failed (start, health, sleep or wake).",
                                ["model"], registry=registry)
        self.cold_start = Histogram(
            "svllm_worker_cold_start_seconds",
            "From an engine's launch to its instance serving (warm-up included).",
            ["model"], buckets=SLOW_BUCKETS, registry=registry)
        self.wake = Histogram("svllm_worker_wake_seconds",
                              "From a wake request to the instance serving again.",
                              ["model"], buckets=SLOW_BUCKETS, registry=registry)
        self.warmup = Histogram("svllm_worker_warmup_seconds",
                                "The warm-up request before a route is published.",
                                ["model"], buckets=SLOW_BUCKETS, registry=registry)

    def instance_gauges(self, states: Callable[[], dict[str, InstanceState]]) -> None:
        """``svllm_worker_instance_state{model,state}``: 1 for the instance's state, 0 for
        the others, so a panel can sum any state across workers."""

        def collect() -> list[Metric]:
            g = GaugeMetricFamily("svllm_worker_instance_state",
                                  "Instances on this worker, one series per state (1: in it).",
                                  labels=["model", "state"])
            for alias, state in sorted(states().items()):
                for s in InstanceState:
                    g.add_metric([alias, s.value], 1.0 if s is state else 0.0)
            return [g]

        self.registry.register(FuncCollector(collect))

    def gpu_gauges(self, gpus: Callable[[], list[GpuInfo]],
                   reserved: Callable[[], dict[int, int]]) -> None:
        """GPU memory per GPU: total and used (NVML, or the fake inventory), and reserved
        (what this worker's engines were placed with)."""

        def collect() -> list[Metric]:
            names = ("total", "used", "reserved")
            fams = {n: GaugeMetricFamily(f"svllm_worker_gpu_memory_{n}_bytes",
                                         f"GPU memory {n}, per GPU.", labels=["gpu"])
                    for n in names}
            held = reserved()
            for gpu in gpus():
                i = str(gpu.index)
                fams["total"].add_metric([i], gpu.memory_total_mb * _MB)
                fams["used"].add_metric([i], gpu.memory_used_mb * _MB)
                fams["reserved"].add_metric([i], held.get(gpu.index, 0) * _MB)
            return list(fams.values())

        self.registry.register(FuncCollector(collect))


async def engine_metrics(client: httpx.AsyncClient, engines: dict[str, EngineProcess],
                         worker_id: str) -> list[Metric]:
    """The ``/metrics`` of every serving engine (by alias), merged family by family with
    ``model`` and ``worker`` labels added; an engine that does not answer is skipped."""

    async def one(alias: str, engine: EngineProcess) -> tuple[str, str]:
        try:
            r = await engine.get(client, "/metrics", _ENGINE_SCRAPE_TIMEOUT_S)
            return alias, r.text if r.status_code == 200 else ""
        except httpx.HTTPError as e:
            logger.info("metrics of engine %s unreachable: %s", alias, e)
            return alias, ""

    merged: dict[str, Metric] = {}
    for alias, text in await asyncio.gather(*(one(a, u) for a, u in engines.items())):
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as e:
            logger.info("metrics of engine %s unreadable: %s", alias, e)
            continue
        for fam in families:
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                labels = s.labels | {"model": alias, "worker": worker_id}
                out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
    return list(merged.values())
