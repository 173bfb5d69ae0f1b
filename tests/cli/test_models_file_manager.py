"""``MODELS_FILE``: a manager applies the file at start and on change (real processes)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.support import Cluster, Proc, snapshot, stays, wait_until

FILE = """\
models:
  - alias: one
    model_name: sim/one
    min_replicas: 0
  - alias: two
    model_name: sim/two
    engine: sim
    min_replicas: 0
"""


def specs(router: Proc) -> dict[str, dict[str, object]]:
    models = httpx.get(f"{router.url}/admin/models", timeout=10).json()["models"]
    return {m["alias"]: m["spec"] for m in models}


def rewrite(path: Path, text: str) -> None:
    # Through a rename, as editors and config management do; the mtime check sees it.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_applied_at_start_and_on_change(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(FILE)
    manager = cluster.manager(MODELS_FILE=str(path), MODELS_FILE_POLL_S="0.2")
    router = cluster.router()
    wait_until(lambda: set(specs(router)) == {"one", "two"}, 20, what="file applied")
    # DEFAULT_ENGINE (sim in the tests) fills the entry without an engine, as the API does.
    assert specs(router)["one"]["engine"] == "sim"

    rewrite(path, FILE.replace("model_name: sim/two", "model_name: sim/two\n    replicas: 2"))
    wait_until(lambda: specs(router)["two"]["replicas"] == 2, 20, what="change applied")

    # Registered by hand and absent from the file: kept without MODELS_FILE_PRUNE.
    r = httpx.post(f"{router.url}/admin/models/register", timeout=10,
                   json={"alias": "extra", "model_name": "sim/x", "min_replicas": 0})
    assert r.status_code == 201
    rewrite(path, FILE)
    wait_until(lambda: specs(router)["two"]["replicas"] == 1, 20, what="reverted")
    assert set(specs(router)) == {"one", "two", "extra"}

    # An invalid file changes nothing and says why in the manager's log.
    before = snapshot(cluster.redis_url, cluster.prefix)
    rewrite(path, FILE + "    colour: red\n")
    wait_until(lambda: "colour: Extra inputs are not permitted" in manager.tail(200), 20,
               what="the error logged")
    assert "models[1] (two)" in manager.tail(200)
    stays(lambda: snapshot(cluster.redis_url, cluster.prefix) == before, 1.0,
          what="nothing changed")


def test_prune(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(FILE)
    cluster.manager(MODELS_FILE=str(path), MODELS_FILE_POLL_S="0.2", MODELS_FILE_PRUNE="true")
    router = cluster.router()
    wait_until(lambda: set(specs(router)) == {"one", "two"}, 20, what="file applied")
    rewrite(path, FILE.split("  - alias: two", maxsplit=1)[0])
    wait_until(lambda: set(specs(router)) == {"one"}, 20, what="two pruned")
