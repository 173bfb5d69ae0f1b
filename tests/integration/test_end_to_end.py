"""Register -> serve through Router -> Worker proxy -> engine process -> unregister."""

from __future__ import annotations

import httpx
import openai
import pytest

from shared import procs
from tests.support import Cluster, chat, model_status, register, wait_serving, wait_until


@pytest.fixture
def pool(cluster: Cluster):
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    return cluster, router


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_register_chat_stream_unregister(cluster: Cluster, fast_lane: str) -> None:
    # The same answers with the fast lane (the default) and through the ASGI app alone.
    cluster.extra_env["FAST_LANE"] = fast_lane
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    r = register(router, "demo", engine="sim",
                 extra_args=["--itl", "0.001", "--embedding-dim", "1024"])
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["engine"] == "sim"

    models = httpx.get(f"{router.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["demo"]
    assert models["data"][0]["engine"] == "sim"

    wait_serving(router, "demo")
    # uvicorn stamps `server: uvicorn` on what the ASGI app answers; the lane writes its own.
    raw = chat(router, "demo")
    assert raw.status_code == 200, raw.text
    assert ("server" in raw.headers) == (fast_lane == "false")
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused")
    plain = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=8)
    assert plain.model == "demo"
    assert plain.choices[0].message.content
    assert plain.usage is not None and plain.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=8,
        stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) == 8
    assert "".join(pieces) == plain.choices[0].message.content

    comp = client.completions.create(model="demo", prompt="once upon", max_tokens=3)
    assert comp.model == "demo" and comp.choices[0].text
    emb = client.embeddings.create(model="demo", input=["a", "b"])
    assert len(emb.data) == 2
    # An answer of several MB crosses both hops whole (it once stalled past 1 MB).
    many = client.embeddings.create(model="demo", input=["word"] * 150,
                                    encoding_format="float", timeout=30)
    assert len(many.data) == 150 and len(many.data[-1].embedding) == 1024

    inst = model_status(router, "demo")
    assert inst is not None
    pid = int(inst["instances"][0]["pid"])
    assert procs.group_alive(pid)

    d = httpx.delete(f"{router.url}/admin/models/demo")
    assert d.status_code == 200, d.text
    gone = chat(router, "demo")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"
    wait_until(lambda: not procs.group_alive(pid), 10, what="engine process group gone")
    assert httpx.get(f"{router.url}/v1/models").json()["data"] == []


def test_same_spec_is_idempotent_and_different_spec_conflicts(pool) -> None:
    _, router = pool
    assert register(router, "m1", engine="sim").status_code == 201
    again = register(router, "m1", engine="sim")
    assert again.status_code == 200 and again.json()["created"] is False
    clash = register(router, "m1", engine="sim", max_model_len=2048)
    assert clash.status_code == 409
    assert clash.json()["error"]["type"] == "invalid_request_error"


def test_failed_start_shows_reason_and_log(cluster: Cluster) -> None:
    cluster.manager()
    # A long retry back-off keeps the instance FAILED while the request waits (the suite's
    # 0.5 s would restart it meanwhile, and the answer would say STARTING).
    cluster.worker("w1", ENGINE_RETRY_BASE_S="60")
    router = cluster.router()
    r = register(router, "broken", engine="sim", extra_args=["--fail-startup"],
                 cold_start_timeout_s=1)
    assert r.status_code == 201

    def failed():
        m = model_status(router, "broken")
        return m and [i for i in m["instances"] if i["state"] == "FAILED"]

    inst = wait_until(failed, 20, what="FAILED instance")[0]
    assert "exited with code 1" in inst["error"]
    assert "simulated start-up failure" in inst["log_tail"]
    r = chat(router, "broken")
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert "FAILED" in r.json()["error"]["message"]
