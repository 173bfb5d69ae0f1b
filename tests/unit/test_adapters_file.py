"""LoRA adapters in the models file: parsing, validation against the models the pool will
have, the diff and the order of apply, and the export round trip (shared/adapters_file.py,
shared/models_file.py). The store here is an in-memory stand-in for the store's interface;
the CLI tests run the same against a real pool (tests/cli/test_apply_adapters.py)."""

from __future__ import annotations

from typing import Any

import pytest

from shared import models_file as mf
from shared.engine_policy import EngineFlags, Sandbox
from shared.models import AdapterSpec, ModelSpec
from shared.store import StoredModel

LORA = ["--enable-lora", "--max-loras", "2"]


def spec(alias: str, lora: bool = True) -> ModelSpec:
    return mf.to_spec({"alias": alias, "model_name": f"sim/{alias}", "engine": "sim",
                       "extra_args": LORA if lora else []}, "sim")


class Mem:
    def __init__(self, models: list[ModelSpec], adapters: list[AdapterSpec]) -> None:
        self.models = {m.alias: m for m in models}
        self.adapters = {a.alias: a for a in adapters}
        self.calls: list[str] = []

    async def list_models(self) -> list[StoredModel]:
        return [StoredModel(s, "v", 0.0) for s in self.models.values()]

    async def register_model(self, s: ModelSpec) -> bool:
        self.calls.append(f"+{s.alias}")
        self.models[s.alias] = s
        return True

    async def delete_model(self, alias: str) -> bool:
        self.calls.append(f"-{alias}")
        return self.models.pop(alias, None) is not None

    async def live_vllm_flags(self) -> list[EngineFlags]:
        return []

    async def list_adapters(self) -> dict[str, AdapterSpec]:
        return dict(self.adapters)

    async def register_adapter(self, a: AdapterSpec) -> str:
        assert a.base in self.models and a.alias not in self.adapters  # bases exist first
        self.calls.append(f"+a:{a.alias}")
        self.adapters[a.alias] = a
        return "created"

    async def delete_adapter(self, alias: str) -> bool:
        self.calls.append(f"-a:{alias}")
        return self.adapters.pop(alias, None) is not None


def adapter(alias: str, base: str = "base", name: str = "org/lora") -> AdapterSpec:
    return AdapterSpec(alias=alias, base=base, adapter=name)


def test_parse_keeps_absent_adapters_apart_from_an_empty_list() -> None:
    assert mf.parse_document("models: []\n").adapters is None
    assert mf.parse_document("models: []\nadapters:\n").adapters == []
    with pytest.raises(mf.SpecError, match="'adapters' must be a list"):
        mf.parse_document("adapters: {alias: x}\n")
    with pytest.raises(mf.SpecError, match="one key, 'models'"):
        mf.parse_document("modles: []\n")


async def plan(store: Mem, text: str, prune: bool = False,
               ) -> tuple[dict[str, ModelSpec], dict[str, AdapterSpec] | None]:
    return await mf.plan(store, mf.parse_document(text), "sim",
                         Sandbox(model_roots=("/loras",)), prune)


FILE = """\
models:
  - {alias: base, model_name: sim/base, engine: sim,
     extra_args: ['--enable-lora', '--max-loras', '2']}
adapters:
  - {alias: sql, base: base, adapter: org/sql-lora}
  - {alias: local, base: pooled, adapter: /loras/x}
"""


@pytest.mark.parametrize(("text", "message"), [
    (FILE.replace("base: pooled", "base: nowhere"),
     "adapters[1] (local): base model 'nowhere' is neither in the file nor registered"),
    (FILE.replace("base: pooled", "base: plain"),
     "adapters[1] (local): base model 'plain' does not have --enable-lora"),
    (FILE.replace("/loras/x", "/etc/x"),
     "adapters[1] (local): adapter '/etc/x' is a local path outside MODEL_ROOTS (/loras)"),
    (FILE.replace("/loras/x", "/loras/../etc"), "adapters[1] (local): adapter: adapter must"),
    (FILE.replace("alias: local", "alias: sql"), "adapters[1] (sql): alias 'sql' appears twice"),
    (FILE.replace("alias: local", "alias: base"), "adapters[1] (base): alias 'base' is a model"),
    (FILE.replace("alias: local", "alias: '-rf'"), "adapters[1] (-rf): alias: String should"),
    (FILE.replace("adapter: org/sql-lora", "adapter: org/sql-lora, rank: 8"),
     "adapters[0] (sql): rank: Extra inputs are not permitted"),
    (FILE.replace("adapter: org/sql-lora", "adapter: '--help'"), "adapters[0] (sql): adapter:"),
])
async def test_bad_adapter_entries_name_the_entry(text: str, message: str) -> None:
    store = Mem([spec("pooled"), spec("plain", lora=False)], [])
    with pytest.raises(mf.SpecError) as e:
        await plan(store, text)
    assert e.value.message.startswith(message), e.value.message
    assert store.calls == []


async def test_a_base_only_in_the_pool_is_refused_when_the_file_prunes_it() -> None:
    store = Mem([spec("pooled")], [])
    _, adapters = await plan(store, FILE)
    assert adapters is not None and sorted(adapters) == ["local", "sql"]
    with pytest.raises(mf.SpecError, match="'pooled' is neither in the file"):
        await plan(store, FILE, prune=True)


async def test_apply_deletes_first_registers_after_and_converges() -> None:
    store = Mem([spec("pooled"), spec("gone")],
                [adapter("local", "pooled", "/loras/old"), adapter("stale", "gone")])
    desired, adapters = await plan(store, FILE)
    d = await mf.apply(store, desired, prune=True, dry_run=True,
                       adapters=adapters)
    assert store.calls == []
    assert d.adapters is not None and d.as_dict()["adapters"] == {
        "added": ["sql"], "changed": {"local": {"adapter": ["/loras/old", "/loras/x"]}},
        "removed": ["stale"], "unchanged": []}
    # Pruning would delete the base 'pooled', so the plan (with prune) refuses; without it:
    await mf.apply(store, desired, prune=False, dry_run=False,
                   adapters=adapters)
    assert store.calls == ["-a:local", "+base", "+a:local", "+a:sql"]
    assert sorted(store.adapters) == ["local", "sql", "stale"]  # kept: no prune
    again = await mf.apply(store, desired, prune=False, dry_run=False,
                           adapters=adapters)
    assert again.empty(prune=False) and again.adapters is not None
    assert sorted(again.adapters.unchanged) == ["local", "sql"]


async def test_a_file_without_adapters_leaves_them_alone() -> None:
    store = Mem([spec("base")], [adapter("x")])
    desired, adapters = await plan(store, "models: []\n", prune=True)
    assert adapters is None
    d = await mf.apply(store, desired, prune=True, dry_run=False,
                       adapters=adapters)
    assert "adapters" not in d.as_dict() and store.adapters == {"x": adapter("x")}


async def test_export_round_trips_adapters() -> None:
    models, adapters = [spec("base")], [adapter("b-one"), adapter("a-two", name="/loras/y")]
    text = mf.export_yaml(models, adapters)
    doc: Any = mf.parse_document(text)
    assert [a["alias"] for a in doc.adapters] == ["a-two", "b-one"]
    store = Mem(models, adapters)
    desired, planned = await plan(store, text)
    d = await mf.apply(store, desired, prune=True, dry_run=True,
                       adapters=planned)
    assert d.empty(prune=True)
    assert "adapters" not in mf.export_yaml(models, [])  # none: the file looks as before
