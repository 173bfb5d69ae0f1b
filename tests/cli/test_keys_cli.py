"""``svllm keys`` and ``svllm usage`` against a real pool."""

from __future__ import annotations

import json
from typing import Any

from tests.cli.support import svllm
from tests.integration.keys_support import ADMIN, chat, known, pool, serving
from tests.support import Cluster, Proc, wait_until


def one_router(cluster: Cluster) -> Proc:
    """A pool with one router, model m1 serving."""
    routers = pool(cluster, 1)
    serving(routers, "m1")
    return routers[0]


def created(r: Proc, *args: str) -> dict[str, Any]:
    """``svllm keys create ARGS --json``'s answer."""
    made = svllm(r, "keys", "create", *args, "--json", token=ADMIN)
    assert made.code == 0, made.err
    return dict(json.loads(made.out))


def test_keys_lifecycle_and_usage_from_the_cli(cluster: Cluster) -> None:
    r = one_router(cluster)
    key = created(r, "--name", "cli", "--tenant", "acme", "--model", "m*", "--rpm", "600")
    assert key["key"].startswith("sk-svllm-") and key["models"] == ["m*"]
    listed = svllm(r, "keys", "list", token=ADMIN)
    assert listed.code == 0 and key["key_id"] in listed.out and key["key"] not in listed.out
    known([r], key["key"])
    assert chat(r, "m1", key["key"]).status_code == 200

    def used() -> dict[str, int] | None:
        u = svllm(r, "usage", "--key", key["key_id"], "--json", token=ADMIN)
        total = json.loads(u.out)["total"] if u.code == 0 else None
        return total if total and total["requests"] == 1 else None

    assert wait_until(used, 5, what="usage")["completion_tokens"] > 0
    table = svllm(r, "usage", "--tenant", "acme", token=ADMIN)
    assert table.code == 0 and "total" in table.out

    rotated = svllm(r, "keys", "rotate", key["key_id"], "--json", token=ADMIN)
    assert rotated.code == 0 and json.loads(rotated.out)["key"] != key["key"]
    assert svllm(r, "keys", "revoke", key["key_id"], token=ADMIN).code == 0
    again = svllm(r, "keys", "revoke", key["key_id"], token=ADMIN)
    assert again.code == 1 and "does not exist" in again.err
    bad = svllm(r, "keys", "create", "--name", "x", "--rpm", "0", token=ADMIN)
    assert bad.code == 1 and "rpm" in bad.err


def test_model_limits_from_the_cli(cluster: Cluster) -> None:
    r = one_router(cluster)
    key = created(r, "--name", "per-model", "--model-limit", "m1=rpm:60",
                  "--model-limit", "x*=tpm:5000,rpm:30")
    assert key["model_limits"] == {"m1": {"rpm": 60}, "x*": {"rpm": 30, "tpm": 5000}}
    listed = svllm(r, "keys", "list", "--json", token=ADMIN)
    mine = [k for k in json.loads(listed.out)["keys"] if k["key_id"] == key["key_id"]]
    assert mine[0]["model_limits"] == key["model_limits"]
    known([r], key["key"])
    # rpm 60 on m1: a burst of one, then one a second.
    codes = [chat(r, "m1", key["key"]).status_code for _ in range(3)]
    assert codes[0] == 200 and 429 in codes
    before = json.loads(svllm(r, "keys", "list", "--json", token=ADMIN).out)["keys"]
    for bad_spec in ("m1", "m1=rpm", "m1=rpm:x", "m1=qps:3", "=rpm:3"):
        bad = svllm(r, "keys", "create", "--name", "bad", "--model-limit", bad_spec,
                    token=ADMIN)
        assert bad.code != 0 and "--model-limit" in bad.err, (bad_spec, bad.err)
    refused = svllm(r, "keys", "create", "--name", "bad", "--model-limit", "m1=rpm:0",
                    token=ADMIN)
    assert refused.code == 1 and "model_limits" in refused.err
    after = json.loads(svllm(r, "keys", "list", "--json", token=ADMIN).out)["keys"]
    assert after == before  # nothing created by a refused command


def test_update_a_key_and_set_tenant_limits_from_the_cli(cluster: Cluster) -> None:
    r = one_router(cluster)
    key = created(r, "--name", "svc", "--tenant", "acme", "--rpm", "600",
                  "--model-limit", "m1=rpm:60")

    def stored() -> dict[str, Any]:
        listed = json.loads(svllm(r, "keys", "list", "--json", token=ADMIN).out)["keys"]
        return next(k for k in listed if k["key_id"] == key["key_id"])

    up = svllm(r, "keys", "update", key["key_id"], "--name", "svc2", "--model", "m*",
               "--max-concurrent", "3", "--no-limit", "rpm", "--no-limit", "model_limits",
               token=ADMIN)
    assert up.code == 0, up.err
    now = stored()
    assert (now["name"], now["models"], now["max_concurrent"], now["rpm"],
            now["model_limits"], now["hint"]) == ("svc2", ["m*"], 3, None, {}, key["hint"])
    known([r], key["key"])
    assert chat(r, "m1", key["key"]).status_code == 200  # the secret is unchanged

    # Refused before or by the API: nothing changes.
    for args, says in ((["--no-limit", "colour"], "--no-limit"),
                       (["--rpm", "5", "--no-limit", "rpm"], "both set and removed"),
                       ([], "nothing to change"), (["--rpm", "0"], "rpm"),
                       (["--priority", "urgent"], "priority")):
        bad = svllm(r, "keys", "update", key["key_id"], *args, token=ADMIN)
        assert bad.code != 0 and says in bad.err, (args, bad.err)
    assert stored() == now
    # A hostile id stays one path segment: a 404, not PATCH /admin/usage (a 405).
    for hostile in ("../usage", "key_0000000000000000"):
        gone = svllm(r, "keys", "update", hostile, "--rpm", "5", token=ADMIN)
        assert gone.code == 1 and "(404 " in gone.err, (hostile, gone.err)

    assert svllm(r, "tenants", "limits", "acme", "--rpm", "120", token=ADMIN).code == 0
    listed = json.loads(svllm(r, "tenants", "list", "--json", token=ADMIN).out)
    assert listed == {"tenants": [{"tenant": "acme", "rpm": 120, "tpm": None, "keys": 1}]}
    table = svllm(r, "tenants", "list", token=ADMIN)
    assert table.code == 0 and "acme" in table.out and "120" in table.out
    dots = svllm(r, "keys", "revoke", "..", token=ADMIN)
    assert dots.code != 0 and "is not a key id" in dots.err, dots.err
    too_long = svllm(r, "usage", "--hours", "744", token=ADMIN)  # 745 hourly rows: refused
    assert too_long.code == 2 and "--hours" in too_long.err, too_long.err
    for hostile, says in (("bad tenant", "tenant: 1-64 letters"), ("../x", "(404 ")):
        bad = svllm(r, "tenants", "limits", hostile, "--rpm", "5", token=ADMIN)
        assert bad.code == 1 and says in bad.err, (hostile, bad.err)
    assert json.loads(svllm(r, "tenants", "list", "--json", token=ADMIN).out) == listed
