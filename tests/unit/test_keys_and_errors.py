from __future__ import annotations

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
    assert k.workers == "svllm:workers"
    assert k.worker("w1") == "svllm:worker:w1"
    assert k.worker_alive("w1") == "svllm:worker:w1:alive"
    assert k.models == "svllm:models"
    assert k.model("qwen") == "svllm:model:qwen"
    assert k.assign("w1") == "svllm:assign:w1"
    assert k.instance("qwen", "w1") == "svllm:instance:qwen:w1"
    assert k.routes("qwen") == "svllm:routes:qwen"
    assert k.lease == "svllm:scheduler:lease"
    assert k.events == "svllm:events"
    assert Keys("other").model("a") == "other:model:a"


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
