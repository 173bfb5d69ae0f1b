"""``svllm adapters`` and ``svllm prefetch`` against a real pool."""

from __future__ import annotations

import json

from tests.cli.support import svllm
from tests.support import Cluster, register, status, wait_until


def test_adapters_and_prefetch_commands(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "base", engine="sim", min_replicas=0,
                    extra_args=["--enable-lora"]).status_code == 201
    r = svllm(router, "adapters", "add", "sql", "base", "org/sql-lora")
    assert r.code == 0 and "sql: registered" in r.out, r.err
    r = svllm(router, "adapters", "add", "bad", "nobase", "org/x")
    assert r.code == 1 and "base model 'nobase' is not registered" in r.err
    r = svllm(router, "adapters", "ls", "--json")
    assert [a["alias"] for a in json.loads(r.out)] == ["sql"]
    assert "base=base" in svllm(router, "adapters", "ls").out
    r = svllm(router, "prefetch", "base", "--worker", "w9")
    assert r.code == 1 and "w9" in r.err
    wait_until(lambda: [w["alive"] for w in status(router)["workers"]] == [True], 20,
               what="w1 alive")
    # The worker has no mirror and no huggingface_hub here: queued, then failed with why.
    r = svllm(router, "prefetch", "base", "--json")
    assert r.code == 0 and json.loads(r.out)["workers"] == ["w1"], r.err
    assert svllm(router, "adapters", "rm", "sql").code == 0
    assert svllm(router, "adapters", "rm", "sql").code == 1
