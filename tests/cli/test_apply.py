"""``svllm apply`` / ``export``: the declarative models file against a real pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cli.support import svllm
from tests.support import Cluster, Proc, snapshot

FILE = """\
models:
  - alias: alpha
    model_name: sim/alpha
    engine: sim
    min_replicas: 0
  - alias: beta
    model_name: sim/beta
    engine: sim
    min_replicas: 0
    max_model_len: 2048
"""


@pytest.fixture
def router(cluster: Cluster) -> Proc:
    cluster.manager()
    cluster.worker("w1")
    return cluster.router()


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def aliases(router: Proc) -> list[str]:
    r = svllm(router, "models", "ls", "--json")
    return sorted(m["alias"] for m in yaml.safe_load(r.out))


def test_dry_run_apply_idempotence_change_and_prune(router: Proc, cluster: Cluster,
                                                    tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    empty = snapshot(cluster.redis_url, cluster.prefix)

    r = svllm(router, "apply", "-f", path, "--dry-run")
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["+ alpha", "+ beta", "would change 2 model(s); 0 unchanged"]
    assert snapshot(cluster.redis_url, cluster.prefix) == empty

    r = svllm(router, "apply", "-f", path)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["+ alpha", "+ beta", "changed 2 model(s); 0 unchanged"]
    assert aliases(router) == ["alpha", "beta"]

    # The same file again changes nothing, in the output and in Redis.
    applied = snapshot(cluster.redis_url, cluster.prefix)
    r = svllm(router, "apply", "-f", path)
    assert r.code == 0 and r.out.splitlines() == ["changed 0 model(s); 2 unchanged"], r.out
    assert snapshot(cluster.redis_url, cluster.prefix) == applied

    # A model registered by hand is outside the file: kept, and shown as such.
    assert svllm(router, "models", "register", "gamma", "sim/gamma", "--engine", "sim",
                 "--min-replicas", "0").code == 0
    changed = FILE.replace("max_model_len: 2048", "max_model_len: 4096\n    replicas: 2")
    path = write(tmp_path, changed)
    r = svllm(router, "apply", "-f", path, "--dry-run")
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "~ beta",
        "    max_model_len: 2048 -> 4096",
        "    replicas: 1 -> 2",
        "  gamma (not in the file; kept, --prune removes it)",
        "would change 1 model(s); 1 unchanged",
    ]
    r = svllm(router, "apply", "-f", path, "--dry-run", "--prune")
    assert r.out.splitlines()[-2:] == ["- gamma", "would change 2 model(s); 1 unchanged"]

    r = svllm(router, "apply", "-f", path)
    assert r.code == 0, r.err
    shown = yaml.safe_load(svllm(router, "models", "show", "beta", "--json").out)
    assert shown["spec"]["max_model_len"] == 4096 and shown["spec"]["replicas"] == 2
    assert aliases(router) == ["alpha", "beta", "gamma"]

    r = svllm(router, "apply", "-f", path, "--prune")
    assert r.code == 0 and r.out.splitlines() == ["- gamma", "changed 1 model(s); 2 unchanged"]
    assert aliases(router) == ["alpha", "beta"]


def test_export_then_apply_changes_nothing(router: Proc, cluster: Cluster,
                                           tmp_path: Path) -> None:
    assert svllm(router, "apply", "-f", write(tmp_path, FILE)).code == 0
    assert svllm(router, "models", "register", "delta", "sim/delta", "--engine", "sim",
                 "--min-replicas", "0", "--extra-arg=--ttft", "--extra-arg=0.01",
                 "--set", "idle_stop_s=60").code == 0
    r = svllm(router, "export")
    assert r.code == 0, r.err
    exported = yaml.safe_load(r.out)
    assert [m["alias"] for m in exported["models"]] == ["alpha", "beta", "delta"]
    assert exported["models"][2] == {"alias": "delta", "model_name": "sim/delta",
                                      "engine": "sim", "extra_args": ["--ttft", "0.01"],
                                      "min_replicas": 0, "idle_stop_s": 60.0}
    before = snapshot(cluster.redis_url, cluster.prefix)
    r = svllm(router, "apply", "-f", write(tmp_path, r.out, "exported.yaml"), "--prune")
    assert r.code == 0 and r.out.splitlines() == ["changed 0 model(s); 3 unchanged"], r.out
    assert snapshot(cluster.redis_url, cluster.prefix) == before


# Files the router refuses: with --prune and --dry-run too (the flags travel with them).
BAD = [
    ("unknown field", FILE + "    colour: red\n",
     "models[1] (beta): colour: Extra inputs are not permitted (400 invalid_request)"),
    ("invalid alias", FILE.replace("alias: beta", "alias: 'be ta'"),
     "models[1] (be ta): alias: String should match pattern"),
    ("bad extra arg", FILE + "    extra_args: ['--port', '1']\n", "models[1] (beta): "),
    ("duplicate alias", FILE.replace("alias: beta", "alias: alpha"),
     "models[1] (alpha): alias 'alpha' appears twice"),
]
# Files svllm cannot read as a models file: refused before any request, whatever the flags.
UNREADABLE = [
    ("not a list", "models: {alias: x}\n", "'models' must be a list"),
    ("other top key", "model: []\n", "must be a mapping with one key, 'models'"),
    ("not yaml", "models: [\n", "is not valid YAML"),
]


def test_bad_file_fails_with_the_message_and_changes_nothing(
        router: Proc, cluster: Cluster, tmp_path: Path) -> None:
    assert svllm(router, "models", "register", "keep", "sim/keep", "--engine", "sim",
                 "--min-replicas", "0").code == 0
    before = snapshot(cluster.redis_url, cluster.prefix)
    cases = [(bad, extra) for bad in BAD for extra in ([], ["--prune"], ["--dry-run"])]
    cases += [(bad, ["--prune"]) for bad in UNREADABLE]
    for (name, text, message), extra in cases:
        r = svllm(router, "apply", "-f", write(tmp_path, text), *extra)
        assert r.code == 1, (name, r.out, r.err)
        assert r.err.startswith("svllm: error: ") and r.err.count("\n") == 1, r.err
        assert message in r.err, r.err
    assert snapshot(cluster.redis_url, cluster.prefix) == before


def test_missing_file(router: Proc, tmp_path: Path) -> None:
    r = svllm(router, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert r.code == 1 and "cannot read" in r.err and "No such file" in r.err
