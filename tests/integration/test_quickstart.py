"""The README's quick start: one command brings up a working pool and Ctrl-C ends it all."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import openai
import pytest

from shared import procs
from tests.support import ROOT, child_pids, free_port, wait_until


@pytest.mark.parametrize("node", [False, True], ids=["services", "node"])
def test_start_all_serves_demo_and_stops_cleanly(tmp_path: Path, node: bool) -> None:
    ports = {n: str(free_port()) for n in ("ROUTER_PORT", "MANAGER_PORT", "WORKER_PORT",
                                           "SVLLM_REDIS_PORT")}
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN", "API_OPEN",
                        "ALLOW_INSECURE")}
    env |= ports | {"SVLLM_RUN_DIR": str(tmp_path), "GPU_BACKEND": "none",
                    "WORKER_ID": "qs-worker"}
    out = tmp_path / "start_all.out"
    # Started the way a script in the background starts it (`setsid ... &`): with SIGINT
    # ignored, which the child inherits. Ctrl-C must still stop everything.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = procs.spawn([sys.executable, "-m", "scripts.start_all",
                            *(["--node"] if node else [])], log_path=out, env=env, cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        wait_until(lambda: "The pool is up" in out.read_text(), 60, interval=0.2,
                   what=f"quick start output:\n{procs.tail(out)}")
        text = out.read_text()
        assert "SIMULATED engine" in text
        # Secure by default: tokens generated on the first run, kept private, required.
        tokens_file = tmp_path / "tokens.env"
        assert tokens_file.stat().st_mode & 0o777 == 0o600
        tokens = dict(line.split("=", 1) for line in tokens_file.read_text().splitlines())
        assert set(tokens) == {"ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN"}
        assert str(tokens_file) in text and "authorization: Bearer $API_TOKEN" in text
        router = f"http://127.0.0.1:{ports['ROUTER_PORT']}"
        assert httpx.get(f"{router}/v1/models").status_code == 401
        assert httpx.get(f"{router}/admin/status").status_code == 401
        client = openai.OpenAI(base_url=f"{router}/v1", api_key=tokens["API_TOKEN"])
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello!"}])
        assert reply.model == "demo" and reply.choices[0].message.content
        auth = {"authorization": f"Bearer {tokens['API_TOKEN']}"}
        models = httpx.get(f"{router}/v1/models", headers=auth).json()["data"]
        assert models[0]["id"] == "demo" and models[0]["engine"] == "sim"
        admin = {"authorization": f"Bearer {tokens['ADMIN_TOKEN']}"}
        security = httpx.get(f"{router}/admin/status", headers=admin).json()["security"]
        assert security["insecure"] is False and security["openai_api"] == "token"
        services = child_pids(proc.pid)
        # redis, manager, worker, router; or redis, manager, and worker + router as one
        assert len(services) == (3 if node else 4)
        health = httpx.get(f"{router}/health").json()
        assert health.get("worker") == ("qs-worker" if node else None)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=60) == 0
        assert "stopped redis" in out.read_text()
        wait_until(lambda: not any(procs.group_alive(p) for p in services), 10,
                   what=f"service processes {services} gone")
    finally:
        procs.stop(proc)
