"""The OpenAI-compatible API: every engine path of :mod:`shared.engine_api` (chat,
completions, embeddings, responses, rerank, score, tokenize, pooling, classify, audio) and
/v1/models."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.adapters import AdapterTable
from services.router.forward import Forwarder
from services.router.prefix import prefix_key
from services.router.routes import RouteTable
from services.router.upstream import Call, Upstreams
from shared.engine_api import FORM_PATHS, JSON_PATHS, PROMPT_PATHS, not_served, serves
from shared.errors import BadRequest, ModelNotFound, NotFound, clip
from shared.fastlane import Handler, Lane, Picker, pass_headers, request_id_of
from shared.http import (
    ClientGone,
    bearer_guard,
    bearer_ok,
    cancel_on_disconnect,
    json_response,
    parse_object,
    read_body,
)
from shared.models import is_valid_name
from shared.multipart import boundary_of, form_field
from shared.store import StoredModel

# The JSON POST paths, all on the fast lane: one dict lookup picks them.
_HOT = {f"/{p}": p for p in JSON_PATHS}


async def _model(
    table: RouteTable, name: object, path: str, adapters: AdapterTable | None = None,
) -> tuple[StoredModel, str | None]:
    """The model a request names, and the LoRA adapter when the name is one (its base model
    is then the one returned)."""
    if not isinstance(name, str) or not name:
        raise BadRequest("model: a model alias is required", param="model")
    model = await table.model(name) if is_valid_name(name) else None
    adapter = None
    if model is None and adapters is not None and is_valid_name(name):
        model = await _base_of(table, adapters, name)
        adapter = name if model is not None else None
    if model is None:
        raise ModelNotFound(f"The model `{clip(name)}` does not exist.", param="model")
    if not serves(model.spec.engine, path):
        raise NotFound(not_served(name, model.spec.engine, path), code="path_not_served")
    return model, adapter


async def _base_of(table: RouteTable, adapters: AdapterTable, name: str) -> StoredModel | None:
    """The base model of adapter ``name``; None when ``name`` is no adapter."""
    spec = await adapters.lookup(name)
    if spec is None:
        return None
    base = await table.model(spec.base)
    if base is None:
        raise ModelNotFound(f"The model `{name}` is a LoRA adapter of `{spec.base}`, which is "
                            "not registered.", param="model")
    return base


def _adapter_cards(table: RouteTable, adapters: AdapterTable) -> list[dict[str, object]]:
    """LoRA adapters as vLLM lists them: a model card with its base as ``parent``."""
    out: list[dict[str, object]] = []
    for alias, a in sorted(adapters.adapters.items()):
        base = table.models.get(a.base)
        if base is not None:
            out.append({"id": alias, "object": "model", "created": int(base.created_at),
                        "owned_by": "svllm", "engine": base.spec.engine,
                        "model_name": a.adapter, "parent": a.base,
                        "serving": bool(table.replicas(a.base))})
    return out


async def _prepare(
    table: RouteTable, body: bytes, path: str, request_id: str, session: str | None,
    prefix_chars: int = 0, adapters: AdapterTable | None = None,
) -> tuple[StoredModel, Call]:
    # Only `model` (and what balancing uses) is read; the body is forwarded untouched.
    data = parse_object(body)
    name = data.get("model")
    model, adapter = await _model(table, name, path, adapters)
    user = data.get("user")
    affinity = session or (user if isinstance(user, str) else None)
    prefix = prefix_key(data, path, prefix_chars) \
        if prefix_chars and not affinity and path in PROMPT_PATHS else None
    # An adapter's request goes to its base model's replicas (the body still names the
    # adapter: the engine serves it under that name).
    call = Call(model.spec.alias, path, body, request_id, data.get("stream") is True,
                affinity or None, prefix=prefix, adapter=adapter)
    return model, call


async def _prepare_form(
    table: RouteTable, body: bytes, content_type: str, path: str, request_id: str,
    adapters: AdapterTable | None = None,
) -> tuple[StoredModel, Call]:
    """An audio upload: the multipart body is forwarded untouched, its `model` field read."""
    boundary = boundary_of(content_type)
    model, adapter = await _model(table, form_field(body, boundary, "model"), path, adapters)
    stream = (form_field(body, boundary, "stream") or "").lower() == "true"
    return model, Call(model.spec.alias, path, body, request_id, stream,
                       content_type=content_type.encode("latin-1"), adapter=adapter)


def fast_lane(table: RouteTable, upstreams: Upstreams, limit: int, token: str | None,
              prefix_chars: int = 0, adapters: AdapterTable | None = None) -> Picker:
    """The steady state on the fast lane (:mod:`shared.fastlane`): a model with a replica
    serving. A cold, sleeping or stopped model, a wrong API token, and a body the lane does
    not take, go to the ASGI routes below, which hold the request or explain the error."""
    expected = token.encode() if token else None

    async def handle(lane: Lane) -> bool:
        if expected is not None and not bearer_ok(lane.header(b"authorization") or b"",
                                                  expected):
            return False
        body = await lane.read_body(limit)
        if body is None:
            return False
        # The id every answer carries (errors included) and the worker and engine get.
        lane.request_id = rid = request_id_of(lane.header(b"x-request-id"))
        session = lane.header(b"x-session-id")
        model, call = await _prepare(
            table, body, _HOT[lane.path], rid.decode("latin-1"),
            session.decode("latin-1") if session else None, prefix_chars, adapters)
        if model.hold is not None or not table.replicas(call.alias):
            return False
        answer = await upstreams.open(call)
        ex = answer.exchange
        if answer.body is not None:
            lane.respond(ex.status, pass_headers(ex.headers, rid), answer.body)
            return True
        try:
            await lane.relay(ex)
        finally:
            upstreams.finished(answer.worker)
        return True

    def pick(method: str, path: str) -> Handler | None:
        return handle if method == "POST" and path in _HOT else None

    return pick


def build_routes(
    table: RouteTable, forwarder: Forwarder, limit: int, token: str | None,
    admin_token: str | None = None, prefix_chars: int = 0,
    adapters: AdapterTable | None = None,
) -> APIRouter:
    api = APIRouter()
    # With an API token set, the admin token is accepted too (the console's playground sends
    # it); such requests leave the fast lane, which checks the API token alone, for this path.
    check = bearer_guard(token, admin_token if token else None)

    async def handle(request: Request, *, path: str) -> Response:
        given = request.headers.get("x-request-id")
        rid = request_id_of(given.encode("latin-1") if given else None).decode("latin-1")
        request.state.request_id = rid  # error answers carry it too (shared/errors.py)
        await check(request)
        body = await read_body(request, limit)
        if path in FORM_PATHS:
            model, call = await _prepare_form(table, body,
                                              request.headers.get("content-type", ""), path, rid,
                                              adapters)
        else:
            model, call = await _prepare(table, body, path, rid,
                                         request.headers.get("x-session-id"), prefix_chars,
                                         adapters)
        if call.stream:
            # Once streaming, Starlette cancels the relay when the client goes away.
            response = await forwarder.handle(model, call)
        else:
            try:
                response = await cancel_on_disconnect(request, forwarder.handle(model, call))
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; for the logs (nginx's)
        response.headers["x-request-id"] = rid
        return response

    # The hot routes are plain Starlette routes: FastAPI's dependency machinery costs tens of
    # microseconds per request and these need none of it (docs/performance.md).
    for path in (*_HOT.values(), *FORM_PATHS):
        api.add_route(f"/{path}", partial(handle, path=path), methods=["POST"])

    def card(alias: str, m: StoredModel) -> dict[str, object]:
        return {"id": alias, "object": "model", "created": int(m.created_at),
                "owned_by": "svllm", "engine": m.spec.engine, "model_name": m.spec.model_name,
                "serving": bool(table.replicas(alias))}

    @api.get("/v1/models", dependencies=[Depends(check)])
    async def models() -> Response:
        data = [card(alias, m) for alias, m in sorted(table.models.items())]
        if adapters is not None:
            data += _adapter_cards(table, adapters)
        return json_response({"object": "list", "data": data})

    @api.get("/v1/models/{alias}", dependencies=[Depends(check)])
    async def model(alias: str) -> Response:
        found = await table.model(alias) if is_valid_name(alias) else None
        if found is None and adapters is not None:
            cards = [c for c in _adapter_cards(table, adapters) if c["id"] == alias]
            if cards:
                return json_response(cards[0])
        if found is None:
            raise ModelNotFound(f"The model `{clip(alias)}` does not exist.", param="model")
        return json_response(card(alias, found))

    return api
