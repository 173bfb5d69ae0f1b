"""LoRA adapters in the models file, with ``svllm apply`` / ``export`` against a real pool."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from tests.cli.support import svllm
from tests.support import Cluster, Proc, chat, snapshot, wait_until

FILE = """\
models:
  - alias: base
    model_name: sim/base
    engine: sim
    min_replicas: 0
    extra_args: ['--enable-lora', '--max-loras', '2']
adapters:
  - alias: sql
    base: base
    adapter: org/sql-lora
  - alias: poet
    base: base
    adapter: org/poet-lora
"""


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_apply_export_change_prune_and_refuse_adapters(cluster: Cluster, tmp_path: Path) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    r = svllm(router, "apply", "-f", write(tmp_path, FILE))
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["+ base", "+ adapter sql", "+ adapter poet",
                                  "changed 1 model(s); 0 unchanged",
                                  "changed 2 adapter(s); 0 unchanged"]
    listed = json.loads(svllm(router, "adapters", "ls", "--json").out)
    assert sorted((a["alias"], a["base"], a["adapter"]) for a in listed) == [
        ("poet", "base", "org/poet-lora"), ("sql", "base", "org/sql-lora")]
    # Served: the base starts from zero and its engine answers under the adapter's name.
    answer = chat(router, "sql")
    assert answer.status_code == 200 and answer.json()["model"] == "sql", answer.text

    exported = svllm(router, "export")
    assert exported.code == 0, exported.err
    assert yaml.safe_load(exported.out)["adapters"] == [
        {"alias": "poet", "base": "base", "adapter": "org/poet-lora"},
        {"alias": "sql", "base": "base", "adapter": "org/sql-lora"}]
    r = svllm(router, "apply", "-f", write(tmp_path, exported.out, "x.yaml"), "--prune")
    assert r.out.splitlines() == ["changed 0 model(s); 1 unchanged",
                                  "changed 0 adapter(s); 2 unchanged"], r.out + r.err

    changed = FILE.replace("org/sql-lora", "org/sql-v2").split("  - alias: poet")[0]
    r = svllm(router, "apply", "-f", write(tmp_path, changed, "y.yaml"), "--prune")
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["~ adapter sql", "    adapter: 'org/sql-lora' -> 'org/sql-v2'",
                                  "- adapter poet", "changed 0 model(s); 1 unchanged",
                                  "changed 2 adapter(s); 0 unchanged"]
    listed = json.loads(svllm(router, "adapters", "ls", "--json").out)
    assert [(a["alias"], a["adapter"]) for a in listed] == [("sql", "org/sql-v2")]

    # A bad adapter entry fails the whole file, naming it; nothing changes.
    before = snapshot(cluster.redis_url, cluster.prefix)
    for text, message in [
        (FILE.replace("base: base\n    adapter: org/poet", "base: ghost\n    adapter: org/poet"),
         "adapters[1] (poet): base model 'ghost' is neither in the file nor registered"),
        (FILE.replace("alias: poet", "alias: '../x'"), "adapters[1] (../x): alias: String"),
        (FILE.replace("org/poet-lora", "/etc/passwd"),
         "adapters[1] (poet): adapter '/etc/passwd' is a local path outside MODEL_ROOTS"),
    ]:
        r = svllm(router, "apply", "-f", write(tmp_path, text, "bad.yaml"), "--prune")
        assert r.code == 1 and message in r.err, r.err
    assert snapshot(cluster.redis_url, cluster.prefix) == before


def adapters(router: Proc) -> dict[str, str]:
    listed = httpx.get(f"{router.url}/admin/adapters", timeout=10).json()["adapters"]
    return {a["alias"]: a["adapter"] for a in listed}


def test_models_file_on_a_manager_applies_adapters(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(FILE)
    manager = cluster.manager(MODELS_FILE=str(path), MODELS_FILE_POLL_S="0.2",
                              MODELS_FILE_PRUNE="true")
    router = cluster.router()
    wait_until(lambda: adapters(router) == {"sql": "org/sql-lora", "poet": "org/poet-lora"},
               20, what="adapters applied")
    path.write_text(FILE.replace("org/sql-lora", "org/sql-v2").split("  - alias: poet")[0])
    wait_until(lambda: adapters(router) == {"sql": "org/sql-v2"}, 20, what="change applied")
    path.write_text(FILE.replace("base: base\n    adapter: org/poet",
                                 "base: ghost\n    adapter: org/poet"))
    wait_until(lambda: "base model 'ghost' is neither in the file" in manager.tail(200), 20,
               what="the error logged")
    assert adapters(router) == {"sql": "org/sql-v2"}
