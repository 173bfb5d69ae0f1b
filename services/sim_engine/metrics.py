"""The simulated engine's Prometheus /metrics page, with vLLM's metric names."""

from __future__ import annotations

from dataclasses import dataclass

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_WAITING_REASONS = ("capacity", "deferred")
_METRICS = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage."),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("vllm:request_success_total", "counter", "Count of successfully processed requests."),
)


@dataclass(frozen=True, slots=True)
class Gauges:
    running: int
    waiting: int
    max_num_seqs: int
    asleep: bool
    prompt_tokens: int
    generation_tokens: int
    completed: int


def render(g: Gauges, label: str) -> str:
    """The page for one engine; ``label`` is its ``model_name="..."`` label."""
    # A sleeping engine has released its KV cache.
    usage = 0.0 if g.asleep else min(1.0, g.running / g.max_num_seqs)
    values = (g.running, g.waiting, usage, g.prompt_tokens, g.generation_tokens, g.completed)
    lines: list[str] = []
    for (name, kind, text), value in zip(_METRICS, values, strict=True):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                  f"{name}{{{label}}} {float(value)}"]
    # vLLM 0.32's breakdown of the waiting requests; a prefix match on
    # vllm:num_requests_waiting would count them twice.
    name = "vllm:num_requests_waiting_by_reason"
    lines += [f"# HELP {name} Number of requests waiting to be processed, by reason.",
              f"# TYPE {name} gauge"]
    for reason in _WAITING_REASONS:
        value = g.waiting if reason == "capacity" else 0
        lines.append(f'{name}{{{label},reason="{reason}"}} {float(value)}')
    return "\n".join(lines) + "\n"
