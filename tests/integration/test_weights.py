"""Weights locality: workers report the weights on their disks, the scheduler places a model
where its weights are, and a prefetch (from a local mirror here: the hub is unreachable) makes
another worker eligible; a failed download says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Cluster, Proc, model_status, register, running_on, wait_until

MB = 1 << 20


def fake_model(root: Path, size_mb: int) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "sim"}')
    (root / "model.safetensors").write_bytes(b"\0" * size_mb * MB)


def local_models(router: Proc) -> dict[str, dict[str, int]]:
    """worker -> model name -> size (MB), as the workers reported them."""
    ws = httpx.get(f"{router.url}/admin/workers", timeout=5).json()["workers"]
    return {w["worker_id"]: {m["name"]: m["size_mb"] for m in w["local_models"]} for w in ws}


def prefetch_state(router: Proc, alias: str) -> dict[str, Any]:
    m = model_status(router, alias)
    assert m is not None
    return dict(m["prefetch"])


@pytest.fixture
def pool(cluster: Cluster, tmp_path: Path) -> Proc:
    cached = tmp_path / "cache2" / "models--org--loc"
    fake_model(cached / "snapshots" / "abc123", 3)
    (cached / "blobs").mkdir()
    fake_model(tmp_path / "mirror" / "org" / "loc", 3)
    cluster.manager()
    fast = {"WEIGHTS_SCAN_INTERVAL_S": "0.5"}
    cluster.worker("w1", HF_HUB_CACHE=str(tmp_path / "cache1"),
                   PREFETCH_SOURCE_DIR=str(tmp_path / "mirror"), **fast)
    cluster.worker("w2", HF_HUB_CACHE=str(tmp_path / "cache2"), **fast)
    router = cluster.router()
    wait_until(lambda: local_models(router).get("w2") == {"org/loc": 3}, 20,
               what="w2 reports its cached model")
    return router


def test_placed_where_the_weights_are_then_prefetch_makes_another_eligible(pool: Proc) -> None:
    router = pool
    # Both workers are idle; without locality the tie goes to w1.
    assert register(router, "loc", engine="sim", model_name="org/loc").status_code == 201
    wait_until(lambda: running_on(router, "loc") == ["w2"], 20, what="placed on w2")

    r = httpx.post(f"{router.url}/admin/models/loc/prefetch", json={"workers": ["w1"]},
                   timeout=5)
    assert r.status_code == 202, r.text
    assert r.json()["workers"] == ["w1"]
    wait_until(lambda: prefetch_state(router, "loc").get("w1", {}).get("state") == "done", 20,
               what="prefetch done")
    assert prefetch_state(router, "loc")["w1"]["done_mb"] == pytest.approx(3, abs=0.01)
    wait_until(lambda: local_models(router)["w1"] == {"org/loc": 3}, 20,
               what="w1 reports the prefetched model")
    # The same weights under another alias: both workers have them, the less loaded wins.
    assert register(router, "loc2", engine="sim", model_name="org/loc").status_code == 201
    wait_until(lambda: running_on(router, "loc2") == ["w1"], 20, what="placed on w1")
    # With no workers named: every live worker that lacks the weights (none now).
    r = httpx.post(f"{router.url}/admin/models/loc/prefetch", timeout=5)
    assert r.status_code == 202 and r.json()["workers"] == []


def test_failed_prefetch_shows_the_reason(pool: Proc) -> None:
    router = pool
    assert register(router, "gone", engine="sim", model_name="org/missing",
                    min_replicas=0).status_code == 201
    r = httpx.post(f"{router.url}/admin/models/gone/prefetch", timeout=5)
    assert r.status_code == 202 and r.json()["workers"] == ["w1", "w2"]

    def ended() -> bool:
        st = prefetch_state(router, "gone")
        return all(st.get(w, {}).get("state") == "failed" for w in ("w1", "w2"))

    wait_until(ended, 20, what="both prefetches failed")
    st = prefetch_state(router, "gone")
    assert "not in the mirror" in st["w1"]["error"]
    assert "huggingface_hub is not installed" in st["w2"]["error"]
    assert "org/missing" not in local_models(router)["w1"]


def test_bad_prefetch_requests_are_refused(pool: Proc) -> None:
    router = pool
    assert register(router, "pm", engine="sim", model_name="org/loc",
                    min_replicas=0).status_code == 201

    def post(alias: str, body: Any) -> httpx.Response:
        return httpx.post(f"{router.url}/admin/models/{alias}/prefetch", json=body, timeout=5)

    assert post("nope", {}).status_code == 404
    assert post("pm", {"workers": ["w9"]}).status_code == 404
    bodies: list[Any] = [{"workers": ["../x"]}, {"workers": []}, {"workers": "w1"},
                         {"extra": 1}, [1]]
    for body in bodies:
        r = post("pm", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
    assert prefetch_state(router, "pm") == {}
