"""Pieces of ROUTER_PROCESSES that need no process: the core count, the sum of the
processes' metrics, and access-log writes that stay whole lines."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.router.metrics import AccessLog, RouterMetrics, _pieces
from services.router.processes import (
    Child,
    _remove_stale_dirs,
    listen,
    sibling_root,
    usable_cores,
)
from services.router.siblings import merge
from shared.metrics import render


def test_cores_are_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    unlimited = usable_cores(tmp_path / "missing")
    assert unlimited >= 1
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == unlimited
    cpu_max.write_text("50000 100000\n")  # half a core: still one process
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{unlimited * 300000} 100000\n")  # more quota than cores: the cores
    assert usable_cores(cpu_max) == unlimited


def test_a_child_reads_its_place_from_the_environment(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setenv("SVLLM_ROUTER_CHILD", "1:4:7:123:/tmp/svllm-router-x:y")
    assert Child.from_env() == Child(1, 4, 7, Path("/tmp/svllm-router-x:y"), 123)
    monkeypatch.delenv("SVLLM_ROUTER_CHILD")
    assert Child.from_env() is None


def test_two_listening_sockets_share_a_port() -> None:
    a = listen("127.0.0.1", 0)
    try:
        b = listen("127.0.0.1", a.getsockname()[1])
        b.close()
    finally:
        a.close()


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_of_processes_are_summed_sample_by_sample() -> None:
    texts = []
    for n in (1, 2):
        registry = CollectorRegistry()
        m = RouterMetrics(registry)
        m.requests.inc(("a", "2xx", "t", "k"), n)
        m.requests.inc((f"only{n}", "5xx", "t", "k"))
        m.duration.observe(("a", "false"), 0.003 * n)
        texts.append(generate_latest(registry).decode())
    summed = _values(bytes(render(merge(texts)).body).decode())
    req = "svllm_router_requests_total"
    assert summed[(req, (("key", "k"), ("model", "a"), ("status", "2xx"), ("tenant", "t")))] == 3
    assert summed[(req, (("key", "k"), ("model", "only1"), ("status", "5xx"),
                         ("tenant", "t")))] == 1
    assert summed[(req, (("key", "k"), ("model", "only2"), ("status", "5xx"),
                         ("tenant", "t")))] == 1
    dur = "svllm_router_request_duration_seconds"
    assert summed[(dur + "_count", (("model", "a"), ("stream", "false")))] == 2
    assert summed[(dur + "_bucket", (("le", "0.005"), ("model", "a"), ("stream", "false")))] == 1
    assert summed[(dur + "_bucket", (("le", "0.01"), ("model", "a"), ("stream", "false")))] == 2


def test_shared_stream_writes_are_whole_lines_of_at_most_pipe_buf() -> None:
    lines = [f"line {i} " + "x" * (i * 37 % 500) for i in range(64)] + ["y" * 5000]
    text = "\n".join(lines) + "\n"
    pieces = _pieces(text, 4096)
    assert "".join(pieces) == text
    for p in pieces:
        assert p.endswith("\n")
        assert len(p.encode()) <= 4096 or p.count("\n") == 1  # a longer line goes alone

    class Counting(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            Counting.writes += 1
            assert len(s.encode()) <= 4096
            return super().write(s)

    out = Counting()
    log = AccessLog(True, 1.0, "json", stream=out, shared_stream=True)
    for i in range(60):
        log.write({"i": i, "pad": "z" * 200})
    log.flush()
    assert out.getvalue().count("\n") == 60
    assert Counting.writes > 1


def test_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    ours = tmp_path / f"svllm-router-{os.getpid()}-abc"
    dead = tmp_path / "svllm-router-999999999-abc"  # above any pid_max: never running
    other = tmp_path / "svllm-router-notapid-abc"
    for d in (ours, dead, other):
        d.mkdir()
        (d / "0.sock").write_text("")
    _remove_stale_dirs(tmp_path)
    assert ours.exists() and other.exists()
    assert not dead.exists()


def test_sibling_sockets_fit_a_unix_address_under_a_deep_tmpdir(tmp_path: Path) -> None:
    # Under pytest-xdist a test's $TMPDIR is long enough that the sockets inside the sibling
    # directory went past sun_path's 107 bytes: every child failed to bind and the router
    # never became healthy.
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    root = sibling_root(str(deep))
    assert root == Path("/tmp")
    made = Path(tempfile.mkdtemp(prefix="svllm-router-4194304-", dir=root))
    try:
        path = str(made / "1023.sock")
        assert len(path) <= 107
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)  # raises OSError("AF_UNIX path too long") past the limit
    finally:
        shutil.rmtree(made)
    assert sibling_root(str(tmp_path.parent.parent)) == tmp_path.parent.parent  # short: kept
