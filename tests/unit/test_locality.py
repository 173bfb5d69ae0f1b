"""Weights locality, pure parts: the scan of a worker's disks and the placement tiers."""

from __future__ import annotations

from pathlib import Path

from services.manager.placement import Choice, WorkerOrder, choose_worker
from services.worker import weights
from shared.models import MAX_LOCAL_MODELS, Assignment, LocalModel, ModelSpec, WorkerView

MB = 1 << 20


def spec(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": "m", "model_name": "org/m", "engine": "sim"} | kw)


def worker(wid: str, has: dict[str, int] | None = None, free: int | None = None) -> WorkerView:
    models = [LocalModel(name=n, size_mb=s) for n, s in (has or {}).items()]
    return WorkerView(worker_id=wid, alive=True, engines=["sim"], local_models=models,
                      cache_free_mb=free)


def test_prefers_the_worker_with_the_weights_over_a_less_loaded_one() -> None:
    ws = [worker("a"), worker("b", {"org/m": 10})]
    busy = {"b": {"x": Assignment(alias="x", worker_id="b")}}
    c = choose_worker(spec(), ws, busy)
    assert isinstance(c, Choice) and c.worker_id == "b"


def test_among_holders_the_least_loaded_and_else_the_usual_choice() -> None:
    ws = [worker("a", {"org/m": 10}), worker("b", {"org/m": 10}), worker("c")]
    busy = {"a": {"x": Assignment(alias="x", worker_id="a")}}
    c = choose_worker(spec(), ws, busy)
    assert isinstance(c, Choice) and c.worker_id == "b"
    # A holder that already runs the alias is skipped: the next replica goes elsewhere.
    runs = {"a": {"m": Assignment(alias="m", worker_id="a")}}
    c = choose_worker(spec(), [worker("a", {"org/m": 10}), worker("c")], runs)
    assert isinstance(c, Choice) and c.worker_id == "c"


def test_then_a_worker_with_room_for_the_download() -> None:
    # Size known from a holder's report: "a" lacks the room, "b" has it.
    holder = worker("h", {"org/m": 500})
    ws = [worker("a", free=100), worker("b", free=1000), holder]
    runs = {"h": {"m": Assignment(alias="m", worker_id="h")}}
    c = choose_worker(spec(), ws, runs)
    assert isinstance(c, Choice) and c.worker_id == "b"
    # Size from the spec when no worker has the weights.
    c = choose_worker(spec(weights_mb=500), [worker("a", free=100), worker("b", free=1000)], {})
    assert isinstance(c, Choice) and c.worker_id == "b"
    # Nobody has the room: placed anyway, as before.
    c = choose_worker(spec(weights_mb=5000), [worker("a", free=100)], {})
    assert isinstance(c, Choice) and c.worker_id == "a"


def _file(path: Path, size_mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size_mb * MB)


def test_scan_reads_the_hub_cache_and_model_roots(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    blob = cache / "models--org--a" / "blobs" / "sha"
    _file(blob, 2)
    link = cache / "models--org--a" / "snapshots" / "rev" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)  # counted once: snapshots link to blobs
    _file(cache / "models--org--partial" / "blobs" / "x.incomplete", 1)  # no snapshot yet
    _file(cache / "datasets--org--d" / "snapshots" / "r" / "f", 1)  # not a model
    root = tmp_path / "models"
    _file(root / "local-llm" / "w.bin", 3)
    _file(root / ".hidden" / "w.bin", 1)
    found = weights.scan(cache, [str(root), str(tmp_path / "absent")])
    assert [(m.name, m.size_mb, m.source) for m in found] == [
        (str(root / "local-llm"), 3, "model_root"), ("org/a", 2, "hf_cache")]
    assert weights.free_mb(tmp_path / "not" / "yet") is not None


def test_scan_is_bounded(tmp_path: Path) -> None:
    for i in range(MAX_LOCAL_MODELS + 5):
        (tmp_path / f"m{i}").mkdir()
    assert len(weights.scan(tmp_path / "hub", [str(tmp_path)])) == MAX_LOCAL_MODELS


def test_hub_cache_dir_follows_huggingface_variables(tmp_path: Path) -> None:
    assert weights.hub_cache_dir(tmp_path / "c", tmp_path / "h") == tmp_path / "c"
    assert weights.hub_cache_dir(None, tmp_path / "h") == tmp_path / "h" / "hub"
    assert weights.repo_id_of("models--org--name--x") == "org/name--x"
    assert weights.repo_id_of("datasets--a--b") is None


def test_the_pass_order_finds_the_holders_too() -> None:
    ws = [worker("a"), worker("b", {"org/m": 10}), worker("c", {"org/other": 1})]
    assigns: dict[str, dict[str, Assignment]] = {"b": {"x": Assignment(alias="x", worker_id="b")}}
    order = WorkerOrder(ws, assigns)
    assert [w.worker_id for w in order.with_weights["org/m"]] == ["b"]
    c = choose_worker(spec(), ws, assigns, None, order)
    assert isinstance(c, Choice) and c.worker_id == "b"
    c = choose_worker(spec(model_name="org/none"), ws, assigns, None, order)
    assert isinstance(c, Choice) and c.worker_id == "a"
