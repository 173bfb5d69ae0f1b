"""API keys across several real routers: create, authenticate, allowlists, rotate, revoke,
expire, and the answers an OpenAI client gets (docs/keys.md)."""

from __future__ import annotations

import time
from functools import partial

import httpx
import pytest

from tests.integration.keys_support import ADMIN, admin, answers, chat, create_key, pool, serving
from tests.support import Cluster, Proc, register, status, wait_until


def refused_everywhere(routers: list[Proc], key: str, within: float = 1.0) -> float:
    """Seconds until every router refuses ``key`` with a 401 (fails past ``within``)."""
    began = time.monotonic()
    pending = set(range(len(routers)))
    while pending and time.monotonic() - began < within + 0.5:
        for i in list(pending):
            if chat(routers[i], "m1", key).status_code == 401:
                pending.discard(i)
    took = time.monotonic() - began
    assert not pending, f"routers {pending} still accept the key after {took:.2f}s"
    return took


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_keys_authenticate_on_every_router(cluster: Cluster, fast_lane: str) -> None:
    routers = pool(cluster, 2, FAST_LANE=fast_lane, API_TOKEN="shared-token")
    assert register(routers[0], "m2", token=ADMIN, engine="sim").status_code == 201
    serving(routers, "m1", "shared-token")
    assert status(routers[0], ADMIN)["security"]["openai_api"] == "token"

    made = create_key(routers[0], models=["m1"], name="alice")
    secret = made["key"]
    assert secret.startswith("sk-svllm-") and len(secret) > 40
    listed = admin(routers[1], "GET", "/keys").json()["keys"]
    assert [k["key_id"] for k in listed] == [made["key_id"]]
    assert "key" not in listed[0] and "secret_hash" not in listed[0]
    assert secret not in admin(routers[1], "GET", f"/keys/{made['key_id']}").text

    for r in routers:
        wait_until(partial(answers, r, "m1", None, 401), 2, what="keys mode on every router")
        assert status(r, ADMIN)["security"]["openai_api"] == "keys"
        bad = chat(r, "m1", "sk-svllm-nope")
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert chat(r, "m1", secret).status_code == 200
        assert chat(r, "m1", "shared-token").status_code == 200  # API_TOKEN still works
        # Not allowed for this key: the very answer of a model that does not exist.
        hidden, missing = chat(r, "m2", secret), chat(r, "nope", secret)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["code"] == missing.json()["error"]["code"]
        assert chat(r, "m2", "shared-token").status_code in (200, 503)
        models = httpx.get(f"{r.url}/v1/models", timeout=5,
                           headers={"authorization": f"Bearer {secret}"}).json()["data"]
        assert [m["id"] for m in models] == ["m1"]


def test_rotate_revoke_expire_within_a_second(cluster: Cluster) -> None:
    routers = pool(cluster, 3)
    serving(routers, "m1")
    made = create_key(routers[0], name="bob")
    old = made["key"]
    for r in routers:
        wait_until(partial(answers, r, "m1", old, 200), 2, what="key known")

    rotated = admin(routers[1], "POST", f"/keys/{made['key_id']}/rotate").json()["key"]
    assert rotated != old
    refused_everywhere(routers, old)
    assert all(chat(r, "m1", rotated).status_code == 200 for r in routers)

    assert admin(routers[2], "DELETE", f"/keys/{made['key_id']}").status_code == 200
    refused_everywhere(routers, rotated)
    assert admin(routers[0], "GET", f"/keys/{made['key_id']}").status_code == 404

    soon = create_key(routers[0], name="brief", expires_at=time.time() + 2)["key"]
    assert chat(routers[1], "m1", soon).status_code == 200 or wait_until(
        lambda: chat(routers[1], "m1", soon).status_code == 200, 1, what="known")
    wait_until(lambda: all(chat(r, "m1", soon).status_code == 401 for r in routers), 5,
               what="the expired key refused everywhere")
    for r in routers:
        gone = chat(r, "m1", soon)
        assert gone.status_code == 401 and "expired" in gone.json()["error"]["message"]


def test_patch_changes_the_allowlist(cluster: Cluster) -> None:
    routers = pool(cluster, 1)
    serving(routers, "m1")
    made = create_key(routers[0], models=["other-*"])
    r = routers[0]
    assert chat(r, "m1", made["key"]).status_code == 404
    upd = admin(r, "PATCH", f"/keys/{made['key_id']}", json={"models": ["m*"], "rpm": 100})
    assert upd.status_code == 200 and upd.json()["rpm"] == 100
    assert chat(r, "m1", made["key"]).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "rpm": 0}, "rpm"),
    ({"name": "x", "priority": "urgent"}, "priority"),
    ({"name": "x", "models": ["a b"]}, "models.0"),
    ({"name": "x", "tenant": "t/1"}, "tenant"),
    ({"name": "x", "colour": "red"}, "colour"),
    ({"tenant": "t"}, "name"),
    ({"name": "x", "model_limits": {"m*": {}}}, "model_limits"),
    ({"name": "x", "model_limits": {"m*": {"rpm": 0}}}, "model_limits.m*.rpm"),
    ({"name": "x", "model_limits": {"a b": {"rpm": 5}}}, "model_limits.a b.[key]"),
])
def test_bad_key_requests_are_400_and_change_nothing(
    cluster: Cluster, body: dict[str, object], param: str
) -> None:
    cluster.extra_env["ADMIN_TOKEN"] = ADMIN
    router = cluster.router()
    r = admin(router, "POST", "/keys", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert admin(router, "GET", "/keys").json()["keys"] == []
    assert admin(router, "PATCH", "/keys/key_nope", json={"rpm": 3}).status_code == 404
    assert status(router, ADMIN)["security"]["openai_api_open"] is True
