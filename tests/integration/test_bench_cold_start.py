"""scripts.bench_cold_start runs beside a live pool without touching it: its own Redis on a
free port (not the pool's SVLLM_REDIS_PORT), its data and logs in a temporary directory that
it removes (it used the pool's port, .run/redis and .run/logs, and left its models and a
worker in the pool's saved data)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from shared import procs
from tests.support import ROOT


def snapshot(run: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in run.rglob("*")} if run.exists() else {}


def test_bench_cold_start_is_isolated(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pool_run = ROOT / ".run"
    before = snapshot(pool_run)
    # The "running pool": its Redis port is taken.
    with socket.socket() as pool_redis:
        pool_redis.bind(("127.0.0.1", 0))
        pool_redis.listen()
        port = pool_redis.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADMIN_TOKEN")}
        env |= {"SVLLM_REDIS_PORT": str(port), "TMPDIR": str(tmp)}
        out = tmp_path / "bench.out"
        proc = procs.spawn([sys.executable, "-m", "scripts.bench_cold_start", "--rounds", "1"],
                           log_path=out, env=env, cwd=ROOT)
        try:
            code = proc.wait(timeout=240)
        finally:
            procs.stop(proc)
    assert code == 0, out.read_text()
    assert "orchestration overhead" in out.read_text()
    assert list(tmp.iterdir()) == []  # its run directory is gone
    assert snapshot(pool_run) == before  # the pool's data and logs untouched
