from __future__ import annotations

import inspect

import orjson
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared.errors import (
    BadRequest,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    UpstreamError,
    install_error_handlers,
)
from shared.keys import Keys


def test_key_layout() -> None:
    k = Keys("svllm")
    assert k.workers == "svllm:{s}:workers"
    assert k.worker("w1") == "svllm:{w:w1}:worker"
    assert k.worker_alive("w1") == "svllm:{w:w1}:alive"
    assert k.models == "svllm:{s}:models"
    assert k.model("qwen") == "svllm:{m:qwen}:model"
    assert k.assign("w1") == "svllm:{s}:assign:w1"
    assert k.instance("qwen", "w1") == "svllm:{m:qwen}:instance:w1"
    assert k.routes("qwen") == "svllm:{m:qwen}:routes"
    assert k.lease == "svllm:{s}:scheduler:lease"
    assert k.events == "svllm:events"
    assert Keys("other").model("a") == "other:{m:a}:model"


def _tag(key: str) -> str:
    """The hash tag Redis Cluster hashes: what is between the first { and the next }."""
    return key.partition("{")[2].partition("}")[0]


def test_every_key_is_tagged_by_what_it_belongs_to() -> None:
    """Keys of one model, one worker, the scheduler: one tag each (so one slot each)."""
    k = Keys("svllm")
    model = [k.model("a"), k.hold("a"), k.manual("a"), k.intent("a"), k.placement("a"),
             k.demand("a"), k.queue("a"), k.stats("a"), k.samples("a", "wake"),
             k.instance("a", "w"), k.instances("a"), k.routes("a"), k.load("a")]
    worker = [k.worker("w"), k.worker_alive("w")]
    sched = [k.pool_id, k.workers, k.models, k.assign("w"), k.ledger("w"), k.autoscale,
             k.models_version, k.routes_version, k.models_log, k.routes_log, k.lease, k.epoch]
    assert {_tag(key) for key in model} == {"m:a"}
    assert {_tag(key) for key in worker} == {"w:w"}
    assert {_tag(key) for key in sched} == {"s"}
    assert all(key.startswith("svllm:{") for key in model + worker + sched)


def test_every_key_family_has_a_hash_tag() -> None:
    """A new key family without a tag would land in a slot of its own on a cluster."""
    k = Keys("svllm")
    for name, member in vars(Keys).items():
        if name.startswith("_") or name == "events":  # a pub/sub channel is not a key
            continue
        if isinstance(member, property):
            key = getattr(k, name)
        elif inspect.isfunction(member):
            key = member(k, *["x"] * (len(inspect.signature(member).parameters) - 1))
        else:
            continue
        assert key.startswith("svllm:{") and _tag(key), f"{name}: {key} has no hash tag"


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    errors = {"bad": BadRequest("nope", param="x"), "missing": ModelNotFound("no such"),
              "busy": NoCapacity("later", retry_after_s=7), "big": PayloadTooLarge("too big"),
              "up": UpstreamError("engine down")}

    @app.get("/raise/{name}")
    async def boom(name: str) -> None:
        if name == "crash":
            raise RuntimeError("unexpected")
        raise errors[name]

    return app


def test_error_mapping_openai_shape() -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    expected = {"bad": (400, "invalid_request_error"), "missing": (404, "invalid_request_error"),
                "busy": (503, "service_unavailable"), "big": (413, "invalid_request_error"),
                "up": (502, "upstream_error"), "crash": (500, "internal_error")}
    for name, (status, type_) in expected.items():
        r = client.get(f"/raise/{name}")
        assert r.status_code == status, name
        err = orjson.loads(r.content)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == type_
    assert client.get("/raise/busy").headers["retry-after"] == "7"
    assert client.get("/nowhere").json()["error"]["type"] == "invalid_request_error"
    assert client.post("/raise/bad").status_code == 405
