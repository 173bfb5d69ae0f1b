"""An engine's load (running + waiting requests) from its Prometheus /metrics text.

Names are matched exactly, sample by sample, so a metric whose name merely starts like a
wanted one (vLLM 0.32's ``vllm:num_requests_waiting_by_reason{reason=...}`` next to
``vllm:num_requests_waiting``) is never counted. The text is parsed with prometheus-client's
own parser; only the lines of the wanted metric families are handed to it, because a vLLM
/metrics page is mostly histogram buckets and this runs once per reconcile per engine.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# The gauges whose sum is an engine's load: requests it runs plus requests it queues.
LOAD_METRICS: frozenset[str] = frozenset({
    "vllm:num_requests_running", "vllm:num_requests_waiting",  # vLLM (and the sim engine)
    "llamacpp:requests_processing", "llamacpp:requests_deferred",  # llama.cpp's llama-server
    "sglang:num_running_reqs", "sglang:num_queue_reqs",  # SGLang
})


def _metric_name(line: str) -> str:
    """The metric name a text-format line is about ('' for blank lines and other comments)."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else ""
    end = len(line)
    for stop in ("{", " ", "\t"):
        i = line.find(stop)
        if i != -1:
            end = min(end, i)
    return line[:end]


def select_lines(text: str, names: frozenset[str]) -> str:
    """The lines of ``text`` (samples, HELP and TYPE) whose metric name is exactly in
    ``names``."""
    starts = tuple(names)
    out = []
    for ln in text.splitlines():
        # A cheap prefix test first (most lines are other families' histogram buckets), then
        # the exact name.
        body = ln[7:] if ln.startswith(("# HELP ", "# TYPE ")) else ln
        if body.startswith(starts) and _metric_name(ln) in names:
            out.append(ln)
    return "\n".join(out) + "\n"


def engine_load(text: str, names: frozenset[str] = LOAD_METRICS) -> float | None:
    """Sum of the samples named exactly in ``names``; None when the text has none of them.

    Raises ValueError on text the Prometheus parser refuses.
    """
    total, seen = 0.0, False
    for family in text_string_to_metric_families(select_lines(text, names)):
        for sample in family.samples:
            if sample.name in names:
                total += sample.value
                seen = True
    return total if seen else None
