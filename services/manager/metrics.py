"""The manager's metrics (docs/observability.md): leadership, scheduler passes, placements,
autoscaling. Stamped by the scheduler once per pass or decision; nothing per request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from shared.metrics import FINE_BUCKETS, FuncCollector

# A placement refusal's text names workers and numbers: the label is its kind, first match
# in this order (the text has one reason per worker considered).
_REASONS = (
    ("no workers registered", "no_workers"),
    ("pinned worker", "pinned_worker_missing"),
    ("MB free", "gpu_memory"),
    ("MAX_CPU_ENGINES", "cpu_engine_cap"),
    ("not available", "engine_unavailable"),
    ("needs a GPU", "needs_gpu"),
    ("not alive", "no_live_worker"),
    ("already runs it", "every_worker_runs_it"),
)
# Scheduler passes: milliseconds for a small pool to seconds for thousands of models.
_PASS_BUCKETS = (*FINE_BUCKETS, 5.0, 10.0, 30.0)


def reason_kind(text: str) -> str:
    for needle, kind in _REASONS:
        if needle in text:
            return kind
    return "other"


class ManagerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pass_duration = Histogram(
            "svllm_manager_reconcile_duration_seconds", "One scheduler pass (leader only).",
            buckets=_PASS_BUCKETS, registry=registry)
        self.placements = Counter(
            "svllm_manager_placements", "Replicas placed on a worker, by who asked.",
            ["model", "source"], registry=registry)
        self.placement_failures = Counter(
            "svllm_manager_placement_failures",
            "Times a model could not be placed (counted when the reason changes), by kind.",
            ["model", "reason"], registry=registry)
        self.autoscale = Counter(
            "svllm_manager_autoscale_decisions", "Autoscaler decisions, by direction.",
            ["model", "direction"], registry=registry)
        self.workers_alive = Gauge(
            "svllm_manager_workers_alive",
            "Workers with a live heartbeat, as of the last pass (leader only).",
            registry=registry)
        self.workers_registered = Gauge(
            "svllm_manager_workers_registered",
            "Workers registered, alive or not, as of the last pass (leader only).",
            registry=registry)

    def leader_gauges(self, epoch: object) -> None:
        """``svllm_manager_leader`` (1/0) and ``svllm_manager_epoch``, read at scrape time
        from the scheduler's state (anything with an ``epoch`` attribute)."""

        def collect() -> list[Metric]:
            e = int(getattr(epoch, "epoch", 0))
            return [GaugeMetricFamily("svllm_manager_leader",
                                      "1 while this manager holds the scheduler lease.",
                                      value=1.0 if e > 0 else 0.0),
                    GaugeMetricFamily("svllm_manager_epoch",
                                      "The lease epoch this manager holds (0: standby).",
                                      value=float(e))]

        self.registry.register(FuncCollector(collect))
