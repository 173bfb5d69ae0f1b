"""The pieces of metrics, access log and tracing that need no process: the lock-free
families against prometheus-client's own exposition, usage parsing, reason kinds, the
access log's lines, and that the OpenTelemetry SDK stays unloaded without an endpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.manager.metrics import reason_kind
from services.router.metrics import AccessLog, Recorder, RequestRecord, RouterMetrics, _usage
from shared.metrics import FastCounter, FastHistogram, FuncCollector, status_class
from shared.principal import Principal
from shared.tracing import make_tracing, valid_traceparent
from tests.support import ROOT


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_fast_histogram_exports_what_prometheus_client_would() -> None:
    buckets = (0.01, 0.1, 1.0)
    values = [0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 0.1000001]
    ours = FastHistogram("h_seconds", "h", ("model",), buckets)
    theirs_reg = CollectorRegistry()
    theirs = Histogram("h_seconds", "h", ["model"], buckets=buckets, registry=theirs_reg)
    for v in values:
        ours.observe(("m",), v)
        theirs.labels("m").observe(v)
    reg = CollectorRegistry()
    reg.register(FuncCollector(lambda: [ours.collect()]))
    got = samples(generate_latest(reg).decode())
    want = {k: v for k, v in samples(generate_latest(theirs_reg).decode()).items()
            if not k[0].endswith("_created")}
    assert got == want


def test_fast_counter_sums_per_label_set() -> None:
    c = FastCounter("svllm_things", "things", ("model", "kind"))
    c.inc(("a", "x"))
    c.inc(("a", "x"), 2)
    c.inc(("b", "y"))
    reg = CollectorRegistry()
    reg.register(FuncCollector(lambda: [c.collect()]))
    got = samples(generate_latest(reg).decode())
    assert got[("svllm_things_total", (("kind", "x"), ("model", "a")))] == 3
    assert got[("svllm_things_total", (("kind", "y"), ("model", "b")))] == 1


def test_status_classes_and_reason_kinds() -> None:
    assert [status_class(s) for s in (200, 404, 429, 499, 502)] == \
        ["2xx", "4xx", "4xx", "499", "5xx"]
    assert reason_kind("w1: needs 1 GPU(s) with 9000 MB free, 0 of 1 have it") == "gpu_memory"
    assert reason_kind("no workers registered") == "no_workers"
    assert reason_kind("w1: not alive; w2: engine 'vllm' not available (has sim)") \
        == "engine_unavailable"
    assert reason_kind("something new") == "other"


def test_usage_from_the_end_of_an_answer() -> None:
    body = b'{"choices":[{"text":"\\"usage\\" in text"}],"usage":{"prompt_tokens":7,' \
           b'"total_tokens":12,"completion_tokens":5}}'
    assert _usage(body) == (7, 5)
    assert _usage(b'data: {"choices":[],"usage":{"prompt_tokens": 3, "completion_tokens": 2}}'
                  b"\n\ndata: [DONE]\n\n") == (3, 2)
    assert _usage(b'{"choices":[]}') is None
    assert _usage(b'{"usage":null}') is None
    assert _usage(b'{"usage":{"prompt_tokens":4,"total_tokens":4}}') == (4, 0)  # embeddings


def test_a_record_counts_once_and_logs_one_line() -> None:
    out = io.StringIO()
    access = AccessLog(True, 1.0, "json", stream=out)
    metrics = RouterMetrics(CollectorRegistry())
    record = Recorder(metrics, access).start("rid-1")
    record.alias = "m"
    record.attempt_failed(ejected=True)
    record.answered("w2", 0.001)
    record.body(b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}')
    record.finish(200)
    record.finish(500)  # a second finish changes nothing
    assert metrics.requests.values == {("m", "2xx", "default", "anonymous"): 1.0}
    assert metrics.failovers.values == {("m",): 1.0}
    assert metrics.ejections.values == {("m",): 1.0}
    assert metrics.attempts.values == {("m", "ok"): 1.0, ("m", "failed"): 1.0}
    assert metrics.tokens.values[("m", "completion", "default")] == 3
    line = json.loads(out.getvalue())
    assert line["request_id"] == "rid-1" and line["status"] == 200 and line["attempts"] == 2
    assert line["replica"] == "w2" and line["prompt_tokens"] == 2
    assert line["logger"] == "svllm.access" and line["level"] == "INFO"


def test_sampling_keeps_errors_and_off_writes_nothing() -> None:
    out = io.StringIO()
    recorder = Recorder(None, AccessLog(True, 0.0, "text", stream=out))
    recorder.start("a").finish(200)
    assert out.getvalue() == ""  # sample 0 is off
    out = io.StringIO()
    recorder = Recorder(None, AccessLog(True, 0.000001, "text", stream=out))
    for _ in range(50):
        recorder.start("ok").finish(200)
    recorder.start("bad").finish(503, "no_replica")
    lines = out.getvalue().splitlines()
    assert any("request_id=bad" in ln and "error=no_replica" in ln for ln in lines)
    assert len(lines) < 5


def test_traceparent_validation() -> None:
    good = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    assert valid_traceparent(good) == good
    for bad in (None, b"", b"00-zz", good + b"\r\nx: y", good.upper()):
        assert valid_traceparent(bad) is None


def test_no_opentelemetry_sdk_without_an_endpoint() -> None:
    assert make_tracing("svllm-router", None) is None
    # FastAPI loads the (no-op) OpenTelemetry API and redis-py the SDK's metrics part; the
    # tracing SDK and the exporter, with their thread and protobuf, are what must stay out.
    code = ("import sys, services.router.main, services.worker.main; "
            "print(any(m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter', "
            "'shared.otel')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_record_line_is_the_fields_line(fmt: str) -> None:
    """The access log formats a record's line straight from it (no dict in between): the
    same text as the generic ``write(record.fields())``, for every optional field."""
    def variants() -> list[RequestRecord]:
        plain = Recorder(None, AccessLog(False, 1.0)).start("rid-a")
        plain.alias, plain.status, plain.attempts, plain.worker = "m", 200, 1, "w1"
        full = Recorder(None, AccessLog(False, 1.0)).start("rid-b")
        full.alias, full.status, full.code, full.stream = "m", 503, "no_replica", True
        full.first_chunk, full.held_s, full.tokens = full.t0 + 0.0123456, 0.5, (3, 7)
        full.principal = Principal("id1", "k1", "t1")
        return [plain, full]

    for rec in variants():
        end = rec.t0 + 0.25
        a, b = io.StringIO(), io.StringIO()
        generic, direct = AccessLog(True, 1.0, fmt, stream=a), AccessLog(True, 1.0, fmt, stream=b)
        generic.write(rec.fields(end))
        direct.write_record(rec, end)
        generic.flush()
        direct.flush()
        line_a, line_b = a.getvalue(), b.getvalue()
        # The timestamps may differ by a millisecond: compare what follows them.
        sep = '"level"' if fmt == "json" else " router "
        assert line_a.split(sep, 1)[1] == line_b.split(sep, 1)[1]
        assert "rid-" in line_b
