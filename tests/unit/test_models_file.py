"""The models file's pure parts: parsing, validation messages, diff, export round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import models_file as mf
from shared.models import ModelSpec
from shared.store import StoredModel


def spec(alias: str, **kw: object) -> ModelSpec:
    return mf.to_spec({"alias": alias, "model_name": f"org/{alias}"} | kw, "vllm")


def test_diff_added_changed_removed_unchanged() -> None:
    current = {"a": spec("a"), "b": spec("b", replicas=2), "c": spec("c")}
    desired = {"a": spec("a"), "b": spec("b", replicas=3, max_model_len=4096), "d": spec("d")}
    d = mf.diff(desired, current)
    assert d.added == ["d"] and d.unchanged == ["a"] and d.removed == ["c"]
    assert d.changed == {"b": {"max_model_len": [None, 4096], "replicas": [2, 3]}}
    assert not d.empty(prune=False) and mf.diff(current, current).empty(prune=True)


def test_default_engine_fills_entries_without_one() -> None:
    assert mf.desired_specs([{"alias": "a", "model_name": "x/y"}], "sim")["a"].engine == "sim"


@pytest.mark.parametrize(("entries", "message"), [
    ([{"alias": "a", "model_name": "x/y", "colour": 1}],
     "models[0] (a): colour: Extra inputs are not permitted"),
    ([{"alias": "a b", "model_name": "x/y"}], "models[0] (a b): alias: String should match"),
    ([{"alias": "a", "model_name": "x/y", "extra_args": ["--port", "1"]}],
     "models[0] (a): extra argument '--port' is set by the pool itself"),
    ([{"alias": "a", "model_name": "x/y", "engine": "tgi"}],
     "models[0] (a): engine must be one of"),
    ([{"alias": "a", "model_name": "x"}, {"alias": "a", "model_name": "y"}],
     "models[1] (a): alias 'a' appears twice"),
    (["just a string"], "models[0]: Input should be a valid dictionary"),
    ({"alias": "a"}, "models must be a list"),
])
def test_bad_entries_name_the_entry_and_the_problem(entries: object, message: str) -> None:
    with pytest.raises(mf.SpecError) as e:
        mf.desired_specs(entries, "vllm")
    assert message in e.value.message
    assert "\n" not in e.value.message and "errors.pydantic.dev" not in e.value.message


@pytest.mark.parametrize(("text", "message"), [
    ("models: [\n", "is not valid YAML: expected the node content"),
    ("- a\n", "must be a mapping with one key, 'models'"),
    ("models: 3\n", "'models' must be a list"),
])
def test_bad_yaml(text: str, message: str) -> None:
    with pytest.raises(mf.SpecError) as e:
        mf.parse_yaml(text, "f.yaml")
    assert message in e.value.message and "\n" not in e.value.message


def test_empty_file_is_no_models() -> None:
    assert mf.parse_yaml("") == [] and mf.parse_yaml("models:\n") == []


def test_export_round_trips_and_keeps_only_what_differs_from_defaults() -> None:
    specs = [spec("b", min_replicas=0, idle_stop_s=60, extra_args=["--enforce-eager"]),
             spec("a")]
    text = mf.export_yaml(specs)
    entries = mf.parse_yaml(text)
    assert entries[0] == {"alias": "a", "model_name": "org/a", "engine": "vllm"}
    assert entries[1] == {"alias": "b", "model_name": "org/b", "engine": "vllm",
                          "extra_args": ["--enforce-eager"], "min_replicas": 0,
                          "idle_stop_s": 60.0}
    again = mf.desired_specs(entries, "sim")
    assert mf.diff(again, {s.alias: s for s in specs}).empty(prune=True)


async def test_apply_dry_run_changes_nothing_and_apply_converges() -> None:
    class Mem:
        def __init__(self) -> None:
            self.specs: dict[str, ModelSpec] = {"old": spec("old"), "b": spec("b")}
            self.calls: list[str] = []

        async def list_models(self) -> list[object]:
            return [StoredModel(s, "v", 0.0) for s in self.specs.values()]

        async def register_model(self, s: ModelSpec) -> bool:
            assert s.alias not in self.specs
            self.calls.append(f"+{s.alias}")
            self.specs[s.alias] = s
            return True

        async def delete_model(self, alias: str) -> bool:
            self.calls.append(f"-{alias}")
            return self.specs.pop(alias, None) is not None

    store = Mem()
    desired = {"a": spec("a"), "b": spec("b", replicas=2)}
    d = await mf.apply(store, desired, prune=True, dry_run=True)  # type: ignore[arg-type]
    assert store.calls == [] and d.added == ["a"] and d.removed == ["old"]
    await mf.apply(store, desired, prune=True, dry_run=False)  # type: ignore[arg-type]
    assert store.calls == ["-b", "+b", "+a", "-old"]
    assert store.specs == desired
    d = await mf.apply(store, desired, prune=True, dry_run=False)  # type: ignore[arg-type]
    assert d.empty(prune=True) and d.unchanged == ["a", "b"]


def test_the_example_file_in_deploy_is_valid() -> None:
    path = Path(__file__).resolve().parents[2] / "deploy" / "models.example.yaml"
    specs = mf.desired_specs(mf.read_file(path), "vllm")
    assert sorted(specs) == ["demo-chat", "demo-cold"]
    assert specs["demo-cold"].min_replicas == 0
