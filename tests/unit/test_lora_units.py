"""LoRA adapters, pure parts: the adapter spec's validation, the engine's slot count, and the
router's preference for replicas that hold the adapter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.router.balancer import holders_first
from shared.models import AdapterSpec, ModelSpec, lora_capacity


def test_adapter_spec_refuses_hostile_names() -> None:
    ok = AdapterSpec(alias="sql-helper", base="qwen-7b",
                     adapter="org/sql-lora")
    assert ok.adapter == "org/sql-lora"
    bad: list[dict[str, object]] = [
        {"alias": "../x"}, {"alias": "-rf"}, {"base": "a/b"}, {"adapter": "../../etc"},
        {"adapter": "-x"}, {"adapter": "a b"}, {"adapter": ""}, {"extra": 1}]
    for change in bad:
        with pytest.raises(ValidationError):
            base: dict[str, object] = {"alias": "a", "base": "b", "adapter": "org/x"}
            AdapterSpec.model_validate(base | change)


def capacity(*args: str) -> int | None:
    return lora_capacity(ModelSpec(alias="b", model_name="org/b", engine="vllm",
                                   extra_args=list(args)))


def test_lora_capacity_follows_the_engine_flags() -> None:
    assert capacity() is None
    assert capacity("--enable-lora") == 1  # vLLM's default --max-loras
    assert capacity("--enable-lora", "--max-loras", "4") == 4
    assert capacity("--max-loras", "4") is None


def test_holders_go_first_in_their_order() -> None:
    assert holders_first(["a", "b", "c", "d"], {"c", "a"}) == ["a", "c", "b", "d"]
    assert holders_first(["a", "b"], frozenset()) == ["a", "b"]
    assert holders_first(["a", "b"], {"z"}) == ["a", "b"]
