"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import os
from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

from services.router.forward import Forwarder
from services.router.routes import RouteTable
from services.router.upstream import Call
from shared.errors import BadRequest, ModelNotFound
from shared.http import ClientGone, cancel_on_disconnect, json_response, parse_object, read_body
from shared.models import is_valid_name


def build_routes(table: RouteTable, forwarder: Forwarder, limit: int) -> APIRouter:
    api = APIRouter()

    async def handle(request: Request, *, path: str) -> Response:
        body = await read_body(request, limit)
        # Only `model` is needed to route; the body itself is forwarded untouched.
        data = parse_object(body)
        name = data.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest("model: a model alias is required", param="model")
        model = await table.model(name) if is_valid_name(name) else None
        if model is None:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        # 32 hex digits: a valid UUID, which llama-cpp-python's server insists on.
        request_id = request.headers.get("x-request-id") or os.urandom(16).hex()
        stream = data.get("stream") is True
        user = data.get("user")
        affinity = request.headers.get("x-session-id") or (user if isinstance(user, str) else None)
        call = Call(name, path, body, request_id, stream, affinity or None)
        if stream:
            # Once streaming, Starlette cancels the relay when the client goes away.
            return await forwarder.handle(model, call)
        try:
            return await cancel_on_disconnect(request, forwarder.handle(model, call))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; for the logs (nginx's code)

    # The hot routes are plain Starlette routes: FastAPI's dependency machinery costs tens of
    # microseconds per request and these need none of it (docs/performance.md).
    for path in ("v1/chat/completions", "v1/completions", "v1/embeddings"):
        api.add_route(f"/{path}", partial(handle, path=path), methods=["POST"])

    @api.get("/v1/models")
    async def models() -> Response:
        data = [
            {
                "id": alias,
                "object": "model",
                "created": int(m.created_at),
                "owned_by": "svllm",
                "engine": m.spec.engine,
                "model_name": m.spec.model_name,
                "serving": bool(table.replicas(alias)),
            }
            for alias, m in sorted(table.models.items())
        ]
        return json_response({"object": "list", "data": data})

    return api
