"""Metrics, request ids and the access log, against real router, worker and manager
processes with simulated engines: counters and histogram counts match the traffic sent."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ROOT,
    Cluster,
    Proc,
    chat,
    engine_call,
    engines,
    register,
    running_on,
    sim_stats,
    wait_until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proc: Proc, path: str = "/metrics", token: str | None = None) -> Samples:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{proc.url}{path}", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)




def stream(router: Proc, alias: str, headers: dict[str, str] | None = None,
           **extra: Any) -> tuple[int, str]:
    body = {"model": alias, "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]} | extra
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      headers=headers or {}, timeout=30) as resp:
        text = "".join(resp.iter_text())
    return resp.status_code, text


def access_lines(proc: Proc) -> list[dict[str, str]]:
    """The router's access log lines (text format: ``key=value`` fields)."""
    out = []
    for line in proc.log.read_text().splitlines():
        if "svllm.access: request " in line:
            fields = line.split("svllm.access: request ", 1)[1].split()
            out.append(dict(f.split("=", 1) for f in fields if "=" in f))
    return out


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_router_counts_what_was_sent(cluster: Cluster, fast_lane: str) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router(FAST_LANE=fast_lane, BREAKER_COOLDOWN_S="120")
    # 10 ms between tokens: a stream's chunks reach the router one by one.
    assert register(router, "m", engine="sim", replicas=2,
                    extra_args=["--itl", "0.01"]).status_code == 201
    wait_until(lambda: sorted(running_on(router, "m")) == ["w1", "w2"], 30, what="2 replicas")
    wait_until(lambda: all(chat(router, "m").status_code == 200 for _ in range(4)), 10,
               what="routes seen")
    before = scrape(router)
    usage = [0, 0]
    for _ in range(5):
        r = chat(router, "m")
        assert r.status_code == 200
        usage[0] += r.json()["usage"]["prompt_tokens"]
        usage[1] += r.json()["usage"]["completion_tokens"]
    for _ in range(3):
        code, text = stream(router, "m", stream_options={"include_usage": True})
        assert code == 200 and "[DONE]" in text
        last = json.loads([ln for ln in text.splitlines() if '"usage"' in ln][-1][6:])
        usage[0] += last["usage"]["prompt_tokens"]
        usage[1] += last["usage"]["completion_tokens"]
    assert chat(router, "nope").status_code == 404
    after = scrape(router)
    assert delta(before, after, "svllm_router_requests_total", model="m", status="2xx",
                 tenant="default", key="anonymous") == 8
    assert delta(before, after, "svllm_router_requests_total", status="4xx") == 1
    assert delta(before, after, "svllm_router_request_duration_seconds_count", model="m") == 8
    assert delta(before, after, "svllm_router_ttft_seconds_count", model="m") == 3
    # Each stream of 4 tokens: at least the 3 gaps between its tokens.
    assert delta(before, after, "svllm_router_stream_chunk_gap_seconds_count", model="m") >= 9
    assert delta(before, after, "svllm_router_overhead_seconds_count", model="m") == 8
    assert delta(before, after, "svllm_router_tokens_total", model="m", kind="prompt") \
        == usage[0]
    assert delta(before, after, "svllm_router_tokens_total", model="m", kind="completion") \
        == usage[1]
    assert delta(before, after, "svllm_router_upstream_attempts_total", model="m",
                 outcome="ok") == 8

    # A failover: every request w1's engine gets fails with a 500 and is retried on w2.
    ports = engines(router, "m")
    engine_call(ports["w1"], "POST", "/sim/faults", json={"fail_rate": 1.0})
    w1_before = sim_stats(ports["w1"])["requests"]
    before = scrape(router)
    sent = 0
    while not httpx.get(f"{router.url}/admin/status").json()["router"]["ejected"]:
        assert chat(router, "m").status_code == 200
        sent += 1
        assert sent < 60, "w1 never ejected"
    after = scrape(router)
    failed = sim_stats(ports["w1"])["requests"] - w1_before
    assert failed == 3  # BREAKER_FAILURES: the third failure ejects
    assert delta(before, after, "svllm_router_upstream_attempts_total", outcome="failed") \
        == failed
    assert delta(before, after, "svllm_router_retries_total", model="m") == failed
    assert delta(before, after, "svllm_router_failovers_total", model="m") == failed
    assert delta(before, after, "svllm_router_breaker_ejections_total", model="m") == 1
    assert delta(before, after, "svllm_router_requests_total", model="m", status="2xx") \
        == sent

    def retried() -> int:
        return sum(1 for a in access_lines(router)
                   if a.get("model") == "m" and a["attempts"] == "2")

    # Access lines are written in batches (every 0.2 s): wait for the last one.
    wait_until(lambda: retried() >= failed, 5, what="the retried requests' access lines")
    assert retried() == failed


def test_held_request_cold_start_and_rejection_are_counted(cluster: Cluster) -> None:
    manager = cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    m_before, w_before, r_before = scrape(manager), scrape(worker), scrape(router)
    assert register(router, "cold", engine="sim", min_replicas=0).status_code == 201
    assert running_on(router, "cold") == []
    r = chat(router, "cold")  # held until the engine starts: a cold start
    assert r.status_code == 200, r.text
    r_after, w_after = scrape(router), scrape(worker)
    assert delta(r_before, r_after, "svllm_router_hold_wait_seconds_count", model="cold") == 1
    assert value(r_after, "svllm_router_held_requests", model="cold") == 0
    assert delta(r_before, r_after, "svllm_router_requests_total", model="cold",
                 status="2xx") == 1
    assert delta(w_before, w_after, "svllm_worker_engine_starts_total", model="cold") == 1
    assert delta(w_before, w_after, "svllm_worker_cold_start_seconds_count", model="cold") == 1
    assert delta(w_before, w_after, "svllm_worker_warmup_seconds_count", model="cold") == 1
    assert value(w_after, "svllm_worker_instance_state", model="cold", state="RUNNING") == 1
    assert value(w_after, "svllm_worker_instance_state", model="cold", state="FAILED") == 0
    m_after = scrape(manager)
    assert value(m_after, "svllm_manager_leader") == 1
    assert value(m_after, "svllm_manager_epoch") >= 1
    assert value(m_after, "svllm_manager_workers_alive") == 1
    assert delta(m_before, m_after, "svllm_manager_placements_total", model="cold",
                 source="scheduler") == 1
    assert value(m_after, "svllm_manager_reconcile_duration_seconds_count") >= 1

    # Stopped by an operator: the router refuses (503 model_stopped), counted by reason.
    stop = httpx.post(f"{router.url}/admin/models/cold/stop", timeout=10)
    assert stop.status_code == 202

    def serving() -> bool:  # in this router's own route table
        models = httpx.get(f"{router.url}/v1/models", timeout=5).json()["data"]
        return any(m["id"] == "cold" and m["serving"] for m in models)

    wait_until(lambda: not serving(), 10, what="the stopped replica out of the routes")
    before = scrape(router)
    assert chat(router, "cold").status_code == 503
    after = scrape(router)
    assert delta(before, after, "svllm_router_rejections_total", model="cold",
                 reason="model_stopped") == 1
    assert delta(before, after, "svllm_router_requests_total", model="cold",
                 status="5xx") == 1


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_request_id_in_access_log_worker_log_and_engine(cluster: Cluster, fast_lane: str
                                                        ) -> None:
    cluster.manager()
    worker = cluster.worker("w1", FAST_LANE=fast_lane, LOG_LEVEL="DEBUG")
    router = cluster.router(FAST_LANE=fast_lane)
    assert register(router, "rid", engine="sim").status_code == 201
    wait_until(lambda: chat(router, "rid").status_code == 200, 30, what="rid serving")
    port = engines(router, "rid")["w1"]
    for n, streamed in enumerate((False, True)):
        rid = f"obs-{fast_lane}-{n}"
        if streamed:
            code, _ = stream(router, "rid", headers={"x-request-id": rid})
        else:
            code = chat(router, "rid", max_tokens=3).status_code  # no id: a generated one
            rid = ""
            r = httpx.post(f"{router.url}/v1/chat/completions", timeout=30,
                           headers={"x-request-id": f"obs-{fast_lane}-0"},
                           json={"model": "rid", "max_tokens": 3,
                                 "messages": [{"role": "user", "content": "hi"}]})
            code, rid = r.status_code, r.headers["x-request-id"]
        assert code == 200 and rid
        assert rid in sim_stats(port)["request_ids"]
        wait_until(lambda rid=rid: any(a.get("request_id") == rid  # type: ignore[misc]
                                       for a in access_lines(router)), 5, what="access line")
        line = next(a for a in access_lines(router) if a.get("request_id") == rid)
        assert line["model"] == "rid" and line["status"] == "200"
        assert line["replica"] == "w1" and line["attempts"] == "1"
        assert line["stream"] == str(streamed) and line["key"] == "anonymous"
        if streamed:
            assert float(line["ttft_ms"]) > 0
        wait_until(lambda rid=rid: f"request_id={rid}" in worker.log.read_text(), 5,  # type: ignore[misc]
                   what="worker log line with the id")
    # Without tracing configured a client's traceparent reaches the engine untouched; one
    # that is not a W3C traceparent is not passed on.
    given = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
    for sent, expected in ((given, given), ("00-not-a-trace", None)):
        assert chat_with(router, "rid", {"traceparent": sent}).status_code == 200
        assert sim_stats(port)["traceparents"][-1] == expected


def test_metrics_token_and_off_switch(cluster: Cluster) -> None:
    cluster.manager()
    router = cluster.router(METRICS_TOKEN="scrape-me", ADMIN_TOKEN="adm", ALLOW_INSECURE="true")
    assert httpx.get(f"{router.url}/metrics", timeout=5).status_code == 401
    bad = {"authorization": "Bearer nope"}
    assert httpx.get(f"{router.url}/metrics", headers=bad, timeout=5).status_code == 401
    for token in ("scrape-me", "adm"):
        r = httpx.get(f"{router.url}/metrics", headers={"authorization": f"Bearer {token}"},
                      timeout=5)
        assert r.status_code == 200 and "# TYPE svllm_router_requests_total counter" in r.text
    off = cluster.router("router-off", METRICS="false", ACCESS_LOG="off")
    assert httpx.get(f"{off.url}/metrics", timeout=5).status_code == 404


class OtlpReceiver:
    """A tiny OTLP/HTTP collector: records the spans POSTed to /v1/traces (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    receiver.record(body)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes
                           if a.key == "service.name")
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append({"service": service, "name": sp.name,
                                       "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                                       "parent": sp.parent_span_id.hex()})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_traceparent_passes_through_and_spans_reach_the_collector(
        cluster: Cluster, otlp: OtlpReceiver, fast_lane: str) -> None:
    cluster.manager()
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "FAST_LANE": fast_lane}
    cluster.worker("w1", **tracing)
    router = cluster.router(**tracing)
    # Cold: the first request is held while the engine starts (a "hold" span).
    assert register(router, "tr", engine="sim", min_replicas=0).status_code == 201
    port = ""
    for streamed in (False, True):
        trace_id = os.urandom(16).hex()
        given = f"00-{trace_id}-{os.urandom(8).hex()}-01"
        headers = {"traceparent": given}
        if streamed:
            assert stream(router, "tr", headers=headers)[0] == 200
        else:
            assert chat_with(router, "tr", headers).status_code == 200
            port = engines(router, "tr")["w1"]
        seen = sim_stats(port)["traceparents"][-1]
        assert seen.split("-")[1] == trace_id  # the same trace, a span of the worker's as parent
        want = {"router request", "upstream attempt", "worker proxy"} | (
            set() if streamed else {"hold"})

        def spans(trace_id: str = trace_id, want: set[str] = want) -> dict[str, dict[str, str]]:
            got = {s["name"]: s for s in otlp.spans if s["trace_id"] == trace_id}
            return got if set(got) == want else {}

        got = wait_until(spans, 10, what=f"spans {sorted(want)} of the trace")
        if not streamed:
            assert got["hold"]["parent"] == got["router request"]["span_id"]
        assert got["router request"]["service"] == "svllm-router"
        assert got["router request"]["parent"] == given.split("-")[2]
        assert got["upstream attempt"]["parent"] == got["router request"]["span_id"]
        assert got["worker proxy"]["service"] == "svllm-worker"
        assert got["worker proxy"]["parent"] == got["upstream attempt"]["span_id"]
        assert seen.split("-")[2] == got["worker proxy"]["span_id"]


def chat_with(router: Proc, alias: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    return httpx.post(f"{router.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=30)


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "svllm.json"
_METRIC_NAME = re.compile(r"\b(?:svllm_[a-z_]+|vllm:[a-z_:]+)")
_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum"),
             "counter": ("_total",)}


def declared(text: str) -> set[str]:
    """Every series name a scrape declares (``# TYPE`` lines), with a histogram's
    ``_bucket``/``_count``/``_sum`` and a counter's ``_total``."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in _SUFFIXES.get(kind, ()))
    return names


def test_every_metric_the_dashboard_queries_is_exported(cluster: Cluster) -> None:
    manager = cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "dash", engine="sim").status_code == 201
    wait_until(lambda: chat(router, "dash").status_code == 200, 30, what="dash serving")
    wait_until(lambda: "vllm:" in httpx.get(f"{worker.url}/metrics/engines").text, 10,
               what="engine metrics through the worker")
    engines_text = httpx.get(f"{worker.url}/metrics/engines", timeout=10).text
    # The engines' series carry the model and the worker they come from.
    assert 'model="dash"' in engines_text and 'worker="w1"' in engines_text
    names: set[str] = set()
    for url in (f"{router.url}/metrics", f"{worker.url}/metrics", f"{manager.url}/metrics",
                f"{worker.url}/metrics/engines"):
        names |= declared(httpx.get(url, timeout=10).text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    missing = []
    for expr in exprs:
        used = set(_METRIC_NAME.findall(expr))
        assert used, expr
        # `a or b`: a metric renamed across engine versions; one of them is enough.
        found = used & names
        if (not found) if " or " in expr else (used - names):
            missing.append(f"{expr}: {sorted(used - names)}")
    assert not missing, "\n".join(missing)


def test_a_manager_with_only_the_internal_token_guards_its_metrics(cluster: Cluster) -> None:
    manager = cluster.manager(INTERNAL_TOKEN="inner")
    assert httpx.get(f"{manager.url}/metrics", timeout=5).status_code == 401
    ok = httpx.get(f"{manager.url}/metrics", headers={"authorization": "Bearer inner"},
                   timeout=5)
    assert ok.status_code == 200 and "svllm_manager_leader" in ok.text


def test_gpu_memory_gauges_and_placement_failures(cluster: Cluster) -> None:
    gpu = {"index": 0, "uuid": "GPU-fake-0", "name": "Fake H100", "memory_total_mb": 81920,
           "memory_used_mb": 2048}
    manager = cluster.manager()
    worker = cluster.worker("gpu1", GPU_BACKEND="fake", FAKE_GPUS=json.dumps([gpu]))
    router = cluster.router()
    assert register(router, "g1", engine="sim", gpu_memory_mb=30000).status_code == 201
    wait_until(lambda: running_on(router, "g1"), 20, what="g1 running")
    mib = 1024 * 1024

    def gauges() -> Samples | None:
        got = scrape(worker)
        reserved = value(got, "svllm_worker_gpu_memory_reserved_bytes", gpu="0")
        return got if reserved == 30000 * mib else None

    got = wait_until(gauges, 10, what="the reservation in the gauges")
    assert value(got, "svllm_worker_gpu_memory_total_bytes", gpu="0") == 81920 * mib
    # The fake inventory shows the engines' memory as a real GPU would: 2048 MB foreign.
    assert value(got, "svllm_worker_gpu_memory_used_bytes", gpu="0") == (2048 + 30000) * mib
    # More than the GPU has left: unplaceable, counted once by kind.
    assert register(router, "g2", engine="sim", gpu_memory_mb=60000).status_code == 201
    wait_until(lambda: value(scrape(manager), "svllm_manager_placement_failures_total",
                             model="g2", reason="gpu_memory") == 1, 10,
               what="the placement failure counted")
    assert value(scrape(manager), "svllm_manager_placements_total", model="g1") == 1
