"""The router's metrics and access log, filled along the request path by one record per
request (:class:`RequestRecord`) and written once, when the request is over.

The request path only stamps times and counts on the record (O(1), no lock, no label
look-up); :meth:`RequestRecord.finish` turns it into metric updates and at most one access
log line. With METRICS=false and ACCESS_LOG=off a record is still made (it is what sets the
request id for the logs) but finishes without doing anything.
"""

from __future__ import annotations

import logging
import random
import re
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from shared.metrics import DURATION_BUCKETS, FINE_BUCKETS, SLOW_BUCKETS, FuncCollector, status_class
from shared.principal import ANONYMOUS, Principal

access_logger = logging.getLogger("svllm.access")

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
# Answers the router gives instead of a replica's: counted as rejections, by their code.
_REJECTING = frozenset((429, 503))


class RouterMetrics:
    """Every router metric, registered once on the service's registry (docs/observability.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "svllm_router_requests", "Requests answered, by model, status class and caller.",
            ["model", "status", "tenant", "key"], registry=registry)
        self.duration = Histogram(
            "svllm_router_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ["model", "stream"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "svllm_router_ttft_seconds",
            "Streams: time from the request's arrival to its first data chunk sent on.",
            ["model"], buckets=DURATION_BUCKETS, registry=registry)
        self.gap = Histogram(
            "svllm_router_stream_chunk_gap_seconds",
            "Streams: time between consecutive chunks sent on.",
            ["model"], buckets=FINE_BUCKETS, registry=registry)
        self.overhead = Histogram(
            "svllm_router_overhead_seconds",
            "The router's own time per request: until the answer's head, less the time "
            "waiting on replicas, back-offs and holds.",
            ["model"], buckets=FINE_BUCKETS, registry=registry)
        self.tokens = Counter(
            "svllm_router_tokens", "Tokens from the answers' usage, by kind.",
            ["model", "kind", "tenant"], registry=registry)
        self.attempts = Counter(
            "svllm_router_upstream_attempts", "Requests sent to a replica, by outcome.",
            ["model", "outcome"], registry=registry)
        self.retries = Counter(
            "svllm_router_retries", "Attempts after a first one failed (failover tries).",
            ["model"], registry=registry)
        self.failovers = Counter(
            "svllm_router_failovers",
            "Requests answered by a replica other than the first one tried.",
            ["model"], registry=registry)
        self.ejections = Counter(
            "svllm_router_breaker_ejections", "Replicas ejected by the circuit breaker.",
            ["model"], registry=registry)
        self.hold_wait = Histogram(
            "svllm_router_hold_wait_seconds",
            "Time requests were held for a cold or sleeping model.",
            ["model"], buckets=SLOW_BUCKETS, registry=registry)
        self.rejections = Counter(
            "svllm_router_rejections",
            "Requests the router refused (429/503), by reason (the error code).",
            ["model", "reason"], registry=registry)

    def held_gauge(self, registry: CollectorRegistry, held: Any) -> None:
        """``svllm_router_held_requests``: read at scrape time from the holder's waits."""

        def collect() -> list[Metric]:
            g = GaugeMetricFamily("svllm_router_held_requests",
                                  "Requests held now for a model to start, on this router.",
                                  labels=["model"])
            for alias, wait in list(held.waits.items()):
                g.add_metric([alias], wait.tickets)
            return [g]

        registry.register(FuncCollector(collect))


class AccessLog:
    def __init__(self, enabled: bool, sample: float) -> None:
        self.enabled = enabled and sample > 0
        self.sample = sample


class Recorder:
    """What a record reports to: the metrics (None: METRICS=false) and the access log."""

    __slots__ = ("access", "metrics")

    def __init__(self, metrics: RouterMetrics | None, access: AccessLog) -> None:
        self.metrics = metrics
        self.access = access

    def start(self, request_id: str, stream: bool = False) -> RequestRecord:
        return RequestRecord(self, request_id, stream)


class RequestRecord:
    """One request's facts, stamped along the path and reported once by :meth:`finish`."""

    __slots__ = ("_tail", "_tail2", "alias", "attempts", "code", "done", "ejections",
                 "first_chunk", "held_s", "hold_start", "last_chunk", "principal", "recorder",
                 "request_id", "status", "stream", "t0", "t_head", "tokens", "upstream_s",
                 "worker")

    def __init__(self, recorder: Recorder, request_id: str, stream: bool) -> None:
        self.recorder = recorder
        self.request_id = request_id
        self.t0 = perf_counter()
        self.stream = stream
        self.alias = ""  # set once the model is known: never a name a client made up
        self.principal: Principal = ANONYMOUS
        self.status = 0
        self.code = ""
        self.worker = ""
        self.attempts = 0
        self.ejections = 0
        self.upstream_s = 0.0  # waiting on replicas (and back-offs) before the answer's head
        self.t_head = 0.0
        self.hold_start = 0.0
        self.held_s = -1.0  # -1: never held
        self.first_chunk = 0.0
        self.last_chunk = 0.0
        self._tail = b""  # the last two chunks: where a stream's usage is
        self._tail2 = b""
        self.tokens: tuple[int, int] | None = None
        self.done = False

    # -- stamps on the path -------------------------------------------------------------------

    def attempt_failed(self, ejected: bool) -> None:
        self.attempts += 1
        self.ejections += ejected

    def answered(self, worker: str, waited_s: float) -> None:
        """A replica took the request: its head (or whole answer) is here."""
        self.attempts += 1
        self.worker = worker
        self.upstream_s += waited_s
        self.t_head = perf_counter()

    def hold_begins(self) -> None:
        self.hold_start = perf_counter()

    def hold_ends(self) -> None:
        if self.hold_start and self.held_s < 0:
            self.held_s = perf_counter() - self.hold_start

    def chunk(self, data: bytes) -> None:
        """A body chunk went to the client (streams and relayed answers)."""
        if not data or data[:1] == b":":  # an SSE comment: the hold's keepalive
            return
        now = perf_counter()
        if not self.first_chunk:
            self.first_chunk = now
        elif self.recorder.metrics is not None and self.stream:
            self.recorder.metrics.gap.labels(self.alias).observe(now - self.last_chunk)
        self.last_chunk = now
        self._tail2, self._tail = self._tail, data

    def body(self, data: bytes) -> None:
        """The whole answer, read before it was sent on: only its usage is wanted."""
        self._tail = data

    # -- the end ------------------------------------------------------------------------------

    def finish(self, status: int, code: str = "") -> None:
        if self.done:
            return
        self.done = True
        self.status = status
        self.code = code or self.code
        self.hold_ends()
        recorder = self.recorder
        if recorder.metrics is None and not recorder.access.enabled:
            return
        end = perf_counter()
        tail = self._tail2 + self._tail if self._tail2 else self._tail
        self.tokens = _usage(tail) if status < 300 else None
        if recorder.metrics is not None:
            self._observe(recorder.metrics, end)
        access = recorder.access
        if access.enabled and (status >= 400 or access.sample >= 1.0
                               or random.random() < access.sample):
            access_logger.info("request", extra={"fields": self.fields(end)})

    def _observe(self, m: RouterMetrics, end: float) -> None:
        alias, p = self.alias, self.principal
        m.requests.labels(alias, status_class(self.status), p.tenant, p.name).inc()
        m.duration.labels(alias, "true" if self.stream else "false").observe(end - self.t0)
        if self.attempts:
            ok = 1 if self.worker else 0
            if ok:
                m.attempts.labels(alias, "ok").inc()
            if self.attempts - ok:
                m.attempts.labels(alias, "failed").inc(self.attempts - ok)
                m.retries.labels(alias).inc(self.attempts - 1)
                if ok:
                    m.failovers.labels(alias).inc()
        if self.ejections:
            m.ejections.labels(alias).inc(self.ejections)
        if self.stream and self.first_chunk:
            m.ttft.labels(alias).observe(self.first_chunk - self.t0)
        if self.t_head:
            held = max(self.held_s, 0.0)
            m.overhead.labels(alias).observe(
                max(0.0, self.t_head - self.t0 - self.upstream_s - held))
        if self.held_s >= 0:
            m.hold_wait.labels(alias).observe(self.held_s)
        if self.code and not self.worker and (self.status in _REJECTING
                                                   or (self.stream and self.status < 300)):
            m.rejections.labels(alias, self.code).inc()
        if self.tokens is not None:
            m.tokens.labels(alias, "prompt", p.tenant).inc(self.tokens[0])
            m.tokens.labels(alias, "completion", p.tenant).inc(self.tokens[1])

    def fields(self, end: float) -> dict[str, object]:
        out: dict[str, object] = {
            "request_id": self.request_id, "model": self.alias, "key": self.principal.name,
            "tenant": self.principal.tenant, "status": self.status, "attempts": self.attempts,
            "replica": self.worker, "stream": self.stream,
            "duration_ms": round((end - self.t0) * 1000, 3)}
        if self.code:
            out["error"] = self.code
        if self.first_chunk and self.stream:
            out["ttft_ms"] = round((self.first_chunk - self.t0) * 1000, 3)
        if self.held_s >= 0:
            out["held_ms"] = round(self.held_s * 1000, 3)
        if self.tokens is not None:
            out["prompt_tokens"], out["completion_tokens"] = self.tokens
        return out


def _usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the usage object at the end of an answer."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT.search(tail, at)
    completion = _COMPLETION.search(tail, at)
    if prompt is None:
        return None
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0
