"""The simulated engine's LoRA adapters, spoken to as vLLM's runtime LoRA API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shared.procs import stop
from tests.integration.test_sim_engine import MODEL, Engine, start_engine


@pytest.fixture
def lora_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = start_engine(tmp_path / "sim.log", "--enable-lora", "--max-loras", "2",
                       "--lora-load-delay", "0.01")
    yield eng
    stop(eng.proc)


def load(engine: Engine, name: str, path: str = "org/x") -> httpx.Response:
    return httpx.post(f"{engine.base}/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": path}, timeout=5)


def unload(engine: Engine, name: str) -> httpx.Response:
    return httpx.post(f"{engine.base}/v1/unload_lora_adapter", json={"lora_name": name},
                      timeout=5)


def test_adapters_load_answer_and_unload_within_the_slot_limit(lora_engine: Engine) -> None:
    client = lora_engine.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="a1", prompt="hi", max_tokens=2)
    assert load(lora_engine, "a1", "org/a1-lora").status_code == 200
    assert load(lora_engine, "a2").status_code == 200
    r = load(lora_engine, "a1")
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = load(lora_engine, "a3")
    assert r.status_code == 400 and "No free LoRA slot" in r.json()["error"]["message"]
    # The adapter answers under its own name; the base under its own.
    assert client.completions.create(model="a1", prompt="hi", max_tokens=2).model == "a1"
    chat = client.chat.completions.create(model="a2", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "a2"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).model == MODEL
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "a1", "a2"}
    assert cards["a1"].model_extra is not None and cards["a1"].model_extra["parent"] == MODEL
    assert cards["a1"].model_extra["root"] == "org/a1-lora"
    assert unload(lora_engine, "a1").status_code == 200
    assert unload(lora_engine, "a1").status_code == 404
    assert load(lora_engine, "a3").status_code == 200
    lora = lora_engine.stats()["lora"]
    assert lora["loaded"] == ["a2", "a3"]
    assert lora["events"] == [["load", "a1"], ["load", "a2"], ["unload", "a1"], ["load", "a3"]]
    for bad in ({}, {"lora_name": ""}, {"lora_name": 3, "lora_path": "x"}):
        assert httpx.post(f"{lora_engine.base}/v1/load_lora_adapter", json=bad,
                          timeout=5).status_code == 400


def test_without_enable_lora_loads_are_refused(tmp_path: Path) -> None:
    eng = start_engine(tmp_path / "sim.log")
    try:
        r = load(eng, "a1")
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
    finally:
        stop(eng.proc)
