"""The pool with a real llama.cpp engine (llama-cpp-python's server) instead of the simulated one.

Register a generated tiny GGUF -> the worker starts `python -m llama_cpp.server` -> RUNNING ->
chat plain and streamed through the router with the openai client -> unregister -> the
engine's process group is gone. Opt in: ``scripts/llamacpp_test.sh`` (installs
llama-cpp-python into .venv-llamacpp and runs ``pytest -m real_llamacpp tests/real_llamacpp``).

The worker runs on the llama.cpp venv's interpreter, as it would on a machine where
llama-cpp-python is installed: its driver finds the ``llama_cpp`` module and starts the engine
with its own ``sys.executable``. (The project's .venv has no llama_cpp, and the worker has no
setting naming another interpreter for llama.cpp, unlike VLLM_COMMAND for vLLM.) That venv
therefore also holds the services' requirements; the manager and router run as usual.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared import procs
from tests.support import Cluster, Proc, free_port, register, running_or_failed, wait_until

pytestmark = [
    pytest.mark.real_llamacpp,
    # The suite's default of 120 s is for simulated engines; leave room on 2 busy cores.
    pytest.mark.timeout(900),
]

ALIAS = "tinygguf"
# The worker's own deadline for an engine to answer its health path; the test waits a bit
# longer so a worker-side timeout shows as FAILED with its log rather than as a test timeout.
ENGINE_START_TIMEOUT_S = 300
RUNNING_DEADLINE_S = ENGINE_START_TIMEOUT_S + 60
MAX_MODEL_LEN = 256
MAX_TOKENS = 8


def _llamacpp_worker(cluster: Cluster, python: str, worker_id: str, **env: str) -> Proc:
    """Cluster.worker, but on ``python`` (the llama.cpp venv's) instead of the project's."""
    port = free_port()
    e = cluster.env(WORKER_ID=worker_id, WORKER_HOST="127.0.0.1", WORKER_PORT=str(port), **env)
    p = Proc(worker_id, [python, "-m", "services.worker.main"], e,
             cluster.tmp / f"{worker_id}.log", url=f"http://127.0.0.1:{port}")
    cluster.procs.append(p)
    return p.start()


def test_real_llamacpp_register_chat_stream_unregister(
    cluster: Cluster, llamacpp_python: str, tiny_gguf: Path, timings: dict[str, float]
) -> None:
    test_started = time.monotonic()
    # A .gguf file is a local path: the operator allows its directory (routers and workers).
    cluster.extra_env["MODEL_ROOTS"] = str(tiny_gguf.parent)
    cluster.manager()
    _llamacpp_worker(cluster, llamacpp_python, "w1", WORKER_ENGINES="llamacpp",
                     ENGINE_START_TIMEOUT_S=str(ENGINE_START_TIMEOUT_S))
    router = cluster.router()

    registered = time.monotonic()
    r = register(router, ALIAS, engine="llamacpp", model_name=str(tiny_gguf),
                 max_model_len=MAX_MODEL_LEN)
    assert r.status_code == 201, r.text

    try:
        inst = wait_until(lambda: running_or_failed(router, ALIAS), RUNNING_DEADLINE_S,
                          interval=0.5,
                          what=f"{ALIAS} RUNNING")
    except AssertionError as e:
        # The services' logs are printed by the cluster fixture; the engine's is here.
        engine_log = cluster.tmp / "state" / "w1" / f"{ALIAS}.log"
        raise AssertionError(f"{e}\n--- {engine_log}\n{procs.tail(engine_log, 60)}") from e
    to_running = time.monotonic() - registered
    timings["register -> RUNNING"] = to_running
    print(f"register -> RUNNING: {to_running:.1f} s")
    pid = int(inst["pid"])
    assert procs.group_alive(pid)
    # The engine is llama-cpp-python's server, started from the worker's interpreter.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"llama_cpp.server" in cmdline, cmdline

    models = httpx.get(f"{router.url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["engine"]) for m in models] == [(ALIAS, "llamacpp")]

    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "hello there, tell me a story"}]
    # Greedy; the generated model never picks EOS (make_tiny_gguf.py), so the length is exact.
    sampling: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0.0}

    plain = client.chat.completions.create(model=ALIAS, messages=messages, **sampling)
    assert plain.model == ALIAS
    assert plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == MAX_TOKENS

    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, stream=True,
                                                 **sampling))
    assert all(c.model == ALIAS for c in chunks)
    # The role first, then text chunks, then the finish reason.
    assert len(chunks) >= 3, chunks
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces), pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # Greedy decoding of the same prompt: the stream says what the plain answer said.
    assert "".join(pieces) == plain.choices[0].message.content

    # A client's own request id that is not a UUID: llama-cpp-python's server would answer
    # 400 to it, so the worker hands that engine a fresh one.
    traced = httpx.post(f"{router.url}/v1/chat/completions", timeout=120,
                        headers={"x-request-id": "my-trace-7"},
                        json={"model": ALIAS, "messages": messages, "max_tokens": 2})
    assert traced.status_code == 200, traced.text

    d = httpx.delete(f"{router.url}/admin/models/{ALIAS}", timeout=10)
    assert d.status_code == 200, d.text
    # Grace (ENGINE_STOP_GRACE_S=3 in tests) then SIGKILL of the group: well within 60 s.
    wait_until(lambda: not procs.group_alive(pid), 60, interval=0.2,
               what="engine process group gone")

    total = time.monotonic() - test_started
    timings["test total (cluster start -> engine gone)"] = total
    print(f"test total: {total:.1f} s")
