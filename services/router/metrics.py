"""The router's metrics and access log, filled along the request path by one record per
request (:class:`RequestRecord`) and written once, when the request is over.

The request path only stamps times and counts on the record (O(1), no lock, no label
look-up); :meth:`RequestRecord.finish` turns it into metric updates and at most one access
log line. With METRICS=false and ACCESS_LOG=off a record is still made (it is what sets the
request id for the logs) but finishes without doing anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import sys
import time
from time import perf_counter
from typing import IO, Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from shared.metrics import (
    DURATION_BUCKETS,
    FINE_BUCKETS,
    SLOW_BUCKETS,
    FastCounter,
    FastHistogram,
    FuncCollector,
    status_class,
)
from shared.principal import ANONYMOUS, Principal
from shared.tracing import Span, Tracing, now_ns, valid_traceparent

_BATCH_LINES = 64
_BATCH_S = 0.2
# Answers the router gives instead of a replica's: counted as rejections, by their code.
_REJECTING = frozenset((429, 503))


# What a record keeps of a relayed answer's last chunks: enough for the usage object.
_TAIL_KEEP = 8192

class RouterMetrics:
    """Every router metric (docs/observability.md), as lock-free families exported at scrape
    time by one collector on the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        c, h = FastCounter, FastHistogram
        self.requests = c("svllm_router_requests",
                          "Requests answered, by model, status class and caller.",
                          ("model", "status", "tenant", "key"))
        self.duration = h("svllm_router_request_duration_seconds",
                          "Time from the request's arrival to the end of its answer.",
                          ("model", "stream"), DURATION_BUCKETS)
        self.ttft = h("svllm_router_ttft_seconds",
                      "Streams: time from the request's arrival to its first data chunk sent on.",
                      ("model",), DURATION_BUCKETS)
        self.gap = h("svllm_router_stream_chunk_gap_seconds",
                     "Streams: time between consecutive chunks sent on.", ("model",),
                     FINE_BUCKETS)
        self.overhead = h("svllm_router_overhead_seconds",
                          "The router's own time per request: until the answer's head, less "
                          "the time waiting on replicas, back-offs and holds.", ("model",),
                          FINE_BUCKETS)
        self.tokens = c("svllm_router_tokens", "Tokens from the answers' usage, by kind.",
                        ("model", "kind", "tenant"))
        self.attempts = c("svllm_router_upstream_attempts",
                          "Requests sent to a replica, by outcome.", ("model", "outcome"))
        self.retries = c("svllm_router_retries",
                         "Attempts after a first one failed (failover tries).", ("model",))
        self.failovers = c("svllm_router_failovers",
                           "Requests answered by a replica other than the first one tried.",
                           ("model",))
        self.ejections = c("svllm_router_breaker_ejections",
                           "Replicas ejected by the circuit breaker.", ("model",))
        self.hold_wait = h("svllm_router_hold_wait_seconds",
                           "Time requests were held for a cold or sleeping model.", ("model",),
                           SLOW_BUCKETS)
        self.rejections = c("svllm_router_rejections",
                            "Requests the router refused (429/503), by reason (error code).",
                            ("model", "reason"))
        self.held: Any = None  # the Holder, for the held-requests gauge
        families = [v for v in vars(self).values() if isinstance(v, FastCounter | FastHistogram)]
        registry.register(FuncCollector(lambda: [f.collect() for f in families]
                                        + self._held_gauge()))

    def _held_gauge(self) -> list[Metric]:
        g = GaugeMetricFamily("svllm_router_held_requests",
                              "Requests held now for a model to start, on this router.",
                              labels=["model"])
        if self.held is not None:
            for alias, wait in list(self.held.waits.items()):
                g.add_metric([alias], wait.tickets)
        return [g]


class AccessLog:
    """The access log: one line per request, in the service's log format, on stderr.

    Written by hand rather than through :mod:`logging`, which costs more per line than all
    of a request's metrics together; lines are gathered and written together at most every
    0.2 s (or 64 lines), so a busy router pays one write per batch, not per request.
    """

    def __init__(self, enabled: bool, sample: float, fmt: str = "json",
                 service: str = "router", stream: IO[str] | None = None,
                 shared_stream: bool = False) -> None:
        self.enabled = enabled and sample > 0
        self.sample = sample
        self.json = fmt == "json"
        self.prefix = f" {service} INFO svllm.access: request "
        self.stream = stream
        self.pending: list[str] = []
        # Other processes write to the same stream (ROUTER_PROCESSES > 1): writes of at most
        # PIPE_BUF bytes, whole lines each, so lines from two processes never interleave.
        self.shared_stream = shared_stream
        self._second = -1
        self._stamp = ""

    def _time(self) -> tuple[str, int]:
        """(the second's stamp, milliseconds)."""
        now = time.time()
        if int(now) != self._second:  # the formatting of the time, once per second
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S" if self.json
                                        else "%Y-%m-%d %H:%M:%S", time.gmtime(now))
        return self._stamp, int(now * 1000) % 1000

    def write(self, fields: dict[str, object]) -> None:
        stamp, ms = self._time()
        if self.json:
            head = {"ts": f"{stamp}.{ms:03d}Z", "level": "INFO",
                    "logger": "svllm.access", "msg": "request"}
            self._append(orjson.dumps(head | fields).decode())
        else:
            self._append(f"{stamp},{ms:03d}{self.prefix}" + " ".join(
                [f"{k}={v}" for k, v in fields.items()]))

    def write_record(self, rec: RequestRecord, end: float) -> None:
        """The line of :meth:`RequestRecord.fields`, formatted straight from the record:
        the same text as :meth:`write` gives, without the dicts and list in between (this
        runs once per request)."""
        stamp, ms = self._time()
        p = rec.principal
        duration = round((end - rec.t0) * 1000, 3)
        ttft = round((rec.first_chunk - rec.t0) * 1000, 3) \
            if rec.first_chunk and rec.stream else None
        if self.json:
            out: dict[str, object] = {
                "ts": f"{stamp}.{ms:03d}Z", "level": "INFO", "logger": "svllm.access",
                "msg": "request", "request_id": rec.request_id, "model": rec.alias,
                "key": p.name, "tenant": p.tenant, "status": rec.status,
                "attempts": rec.attempts, "replica": rec.worker, "stream": rec.stream,
                "duration_ms": duration}
            if rec.code:
                out["error"] = rec.code
            if ttft is not None:
                out["ttft_ms"] = ttft
            if rec.held_s >= 0:
                out["held_ms"] = round(rec.held_s * 1000, 3)
            if rec.tokens is not None:
                out["prompt_tokens"], out["completion_tokens"] = rec.tokens
            self._append(orjson.dumps(out).decode())
            return
        line = (f"{stamp},{ms:03d}{self.prefix}request_id={rec.request_id} model={rec.alias} "
                f"key={p.name} tenant={p.tenant} status={rec.status} attempts={rec.attempts} "
                f"replica={rec.worker} stream={rec.stream} duration_ms={duration}")
        if rec.code:
            line += f" error={rec.code}"
        if ttft is not None:
            line += f" ttft_ms={ttft}"
        if rec.held_s >= 0:
            line += f" held_ms={round(rec.held_s * 1000, 3)}"
        if rec.tokens is not None:
            line += f" prompt_tokens={rec.tokens[0]} completion_tokens={rec.tokens[1]}"
        self._append(line)

    def _append(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) >= _BATCH_LINES:
            self.flush()
        elif len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_later(_BATCH_S, self.flush)
            except RuntimeError:  # no loop (a unit test): at once
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        text = "\n".join(self.pending) + "\n"
        self.pending.clear()
        stream = self.stream or sys.stderr
        try:
            for piece in _pieces(text) if self.shared_stream else (text,):
                stream.write(piece)
                stream.flush()
        except (OSError, ValueError) as e:  # stderr closed or full: the log is best-effort
            logging.getLogger(__name__).debug("access log not written: %s", e)


def _pieces(text: str, limit: int = select.PIPE_BUF) -> list[str]:
    """``text`` (whole lines) cut into runs of whole lines of at most ``limit`` bytes each
    (a longer line alone), each one atomic in a write to a pipe."""
    out: list[str] = []
    run: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if run and size + n > limit:
            out.append("".join(run))
            run, size = [], 0
        run.append(line)
        size += n
    if run:
        out.append("".join(run))
    return out


class Recorder:
    """What a record reports to: the metrics (None: METRICS=false) and the access log."""

    __slots__ = ("access", "metrics", "tracing")

    def __init__(self, metrics: RouterMetrics | None, access: AccessLog,
                 tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.access = access
        self.tracing = tracing

    def start(self, request_id: str, traceparent: bytes | None = None) -> RequestRecord:
        return RequestRecord(self, request_id, valid_traceparent(traceparent))


class RequestRecord:
    """One request's facts, stamped along the path and reported once by :meth:`finish`."""

    __slots__ = ("_attempt", "_tail", "_tail2", "alias", "attempts", "code", "done",
                 "ejections", "first_chunk", "held_s", "hold_start", "last_chunk", "principal",
                 "recorder", "request_id", "span", "status", "stream", "t0", "t_head", "tokens",
                 "traceparent", "upstream_s", "worker")

    def __init__(self, recorder: Recorder, request_id: str, traceparent: bytes | None) -> None:
        self.recorder = recorder
        self.request_id = request_id
        self.t0 = perf_counter()
        self.stream = False
        # The client's, passed on as it is; with tracing, each attempt's span's instead.
        self.traceparent = traceparent
        self.span: Span | None = None
        self._attempt: Span | None = None
        if recorder.tracing is not None:
            self.span = recorder.tracing.span("router request", traceparent,
                                              {"svllm.request_id": request_id})
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

    def upstream_traceparent(self, worker: str) -> bytes | None:
        """The traceparent an attempt sends on: the client's, or with tracing the attempt's
        own span's (started here, ended by :meth:`attempt_failed` or :meth:`answered`)."""
        if self.span is None:
            return self.traceparent
        self._attempt = self.span.child("upstream attempt", {"svllm.worker": worker})
        return self._attempt.traceparent()

    def attempt_failed(self, ejected: bool, error: str = "") -> None:
        self.attempts += 1
        self.ejections += ejected
        if self._attempt is not None:
            self._attempt.end(error or "failed")
            self._attempt = None

    def answered(self, worker: str, waited_s: float) -> None:
        """A replica took the request: its head (or whole answer) is here."""
        if self._attempt is not None:
            self._attempt.end()
            self._attempt = None
        self.attempts += 1
        self.worker = worker
        self.upstream_s += waited_s
        self.t_head = perf_counter()

    def hold_begins(self) -> None:
        self.hold_start = perf_counter()

    def hold_ends(self) -> None:
        if self.hold_start and self.held_s < 0:
            self.held_s = perf_counter() - self.hold_start
            if self.span is not None:
                ended = now_ns()
                self.span.child("hold", {"svllm.model": self.alias},
                                ended - int(self.held_s * 1e9)).end(end_ns=ended)

    def chunk(self, data: bytes) -> None:
        """A body chunk went to the client (streams and relayed answers)."""
        if not data or data[:1] == b":":  # an SSE comment: the hold's keepalive
            return
        now = perf_counter()
        if not self.first_chunk:
            self.first_chunk = now
        elif self.recorder.metrics is not None and self.stream:
            self.recorder.metrics.gap.observe((self.alias,), now - self.last_chunk)
        self.last_chunk = now
        if len(data) > _TAIL_KEEP:  # a large relayed chunk: only its end can hold the usage
            data = data[-_TAIL_KEEP:]  # (a copy: the chunk itself is not kept alive)
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
        if self.span is not None:
            self._end_span()
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
            access.write_record(self, end)

    def _end_span(self) -> None:
        assert self.span is not None
        if self._attempt is not None:  # cancelled mid-attempt
            self._attempt.end("cancelled")
        for k, v in (("svllm.model", self.alias), ("http.response.status_code", self.status),
                     ("svllm.worker", self.worker), ("svllm.attempts", self.attempts),
                     ("svllm.tenant", self.principal.tenant), ("svllm.key", self.principal.name)):
            self.span.set(k, v)
        self.span.end(self.code if self.status >= 500 else "")

    def _observe(self, m: RouterMetrics, end: float) -> None:
        key = (self.alias,)
        p = self.principal
        status = "2xx" if 200 <= self.status < 300 else status_class(self.status)
        m.requests.inc((self.alias, status, p.tenant, p.name))
        m.duration.observe((self.alias, "true" if self.stream else "false"), end - self.t0)
        if self.attempts:
            ok = 1 if self.worker else 0
            if ok:
                m.attempts.inc((self.alias, "ok"))
            if self.attempts - ok:
                m.attempts.inc((self.alias, "failed"), self.attempts - ok)
                m.retries.inc(key, self.attempts - 1)
                if ok:
                    m.failovers.inc(key)
        if self.ejections:
            m.ejections.inc(key, self.ejections)
        if self.stream and self.first_chunk:
            m.ttft.observe(key, self.first_chunk - self.t0)
        if self.t_head:
            held = max(self.held_s, 0.0)
            m.overhead.observe(key, max(0.0, self.t_head - self.t0 - self.upstream_s - held))
        if self.held_s >= 0:
            m.hold_wait.observe(key, self.held_s)
        if self.code and not self.worker and (self.status in _REJECTING
                                                   or (self.stream and self.status < 300)):
            m.rejections.inc((self.alias, self.code))
        if self.tokens is not None:
            m.tokens.inc((self.alias, "prompt", p.tenant), self.tokens[0])
            m.tokens.inc((self.alias, "completion", p.tenant), self.tokens[1])

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
    """(prompt, completion) tokens from the usage object at the end of an answer: the flat
    object after the last ``"usage"`` key, parsed alone (a regular expression over the tail
    cost several times as much per request)."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.find(b"{", at)
    end = tail.find(b"}", start)
    if start < 0 or end < 0 or tail.find(b"null", at, start) >= 0:
        return None
    try:
        usage = orjson.loads(tail[start:end + 1])
    except orjson.JSONDecodeError:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion
