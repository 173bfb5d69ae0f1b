"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.router.forward import Forwarder
from services.router.metrics import Recorder, RequestRecord
from services.router.routes import RouteTable
from services.router.upstream import Call, Upstreams
from shared.errors import ApiError, BadRequest, ModelNotFound, clip
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
from shared.logs import REQUEST_ID
from shared.models import is_valid_name
from shared.store import StoredModel

_HOT = {f"/{p}": p for p in ("v1/chat/completions", "v1/completions", "v1/embeddings")}


async def _prepare(
    table: RouteTable, body: bytes, path: str, request_id: str, session: str | None,
    record: RequestRecord | None = None,
) -> tuple[StoredModel, Call]:
    # Only `model` (and what balancing uses) is read; the body is forwarded untouched.
    data = parse_object(body)
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("model: a model alias is required", param="model")
    model = await table.model(name) if is_valid_name(name) else None
    if model is None:
        raise ModelNotFound(f"The model `{clip(name)}` does not exist.", param="model")
    user = data.get("user")
    affinity = session or (user if isinstance(user, str) else None)
    stream = data.get("stream") is True
    call = Call(name, path, body, request_id, stream, affinity or None, record=record)
    if record is not None:
        record.alias, record.stream, record.principal = name, stream, call.principal
    return model, call


def fast_lane(table: RouteTable, upstreams: Upstreams, limit: int, token: str | None,
              recorder: Recorder) -> Picker:
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
        rid_text = rid.decode("latin-1")
        REQUEST_ID.set(rid_text)  # this request's task: its log lines carry the id
        record = recorder.start(rid_text, lane.header(b"traceparent"))
        status, code = 499, ""  # cancelled: the client went away
        try:
            session = lane.header(b"x-session-id")
            model, call = await _prepare(table, body, _HOT[lane.path], rid_text,
                                         session.decode("latin-1") if session else None, record)
            if model.hold is not None or not table.replicas(call.alias):
                status = 0  # the ASGI route takes it, with a record of its own
                return False
            answer = await upstreams.open(call)
            ex = answer.exchange
            status = ex.status
            if answer.body is not None:
                lane.respond(ex.status, pass_headers(ex.headers, rid), answer.body)
                return True
            lane.watch = record
            try:
                await lane.relay(ex)
            finally:
                upstreams.finished(answer.worker)
            return True
        except ApiError as e:
            status, code = e.status, e.code
            raise
        except Exception:
            status = 500
            raise
        finally:
            if status:
                record.finish(status, code)

    def pick(method: str, path: str) -> Handler | None:
        return handle if method == "POST" and path in _HOT else None

    return pick


class Watched(Response):
    """An answer sent through the ASGI app, with its record told of its status and chunks
    and finished once it is over, however it ended."""

    def __init__(self, inner: Response, record: RequestRecord) -> None:
        self.inner = inner
        self.record = record
        self.status_code = inner.status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        status = 499

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                record.chunk(message.get("body", b""))
            await send(message)

        try:
            await self.inner(scope, receive, watched)
        finally:
            record.finish(status)


def build_routes(
    table: RouteTable, forwarder: Forwarder, limit: int, token: str | None,
    recorder: Recorder, admin_token: str | None = None,
) -> APIRouter:
    api = APIRouter()
    # With an API token set, the admin token is accepted too (the console's playground sends
    # it); such requests leave the fast lane, which checks the API token alone, for this path.
    check = bearer_guard(token, admin_token if token else None)

    async def handle(request: Request, *, path: str) -> Response:
        given = request.headers.get("x-request-id")
        rid = request_id_of(given.encode("latin-1") if given else None).decode("latin-1")
        request.state.request_id = rid  # error answers carry it too (shared/errors.py)
        REQUEST_ID.set(rid)
        traceparent = request.headers.get("traceparent")
        record = recorder.start(rid, traceparent.encode("latin-1") if traceparent else None)
        try:
            await check(request)
            body = await read_body(request, limit)
            model, call = await _prepare(table, body, path, rid,
                                         request.headers.get("x-session-id"), record)
            if call.stream:
                # Once streaming, Starlette cancels the relay when the client goes away.
                response = await forwarder.handle(model, call)
            else:
                try:
                    response = await cancel_on_disconnect(request,
                                                          forwarder.handle(model, call))
                except ClientGone:
                    record.finish(499)
                    return Response(status_code=499)  # nobody reads it; for the logs (nginx's)
        except ApiError as e:
            record.finish(e.status, e.code)
            raise
        except Exception:
            record.finish(500, "internal_error")
            raise
        response.headers["x-request-id"] = rid
        return Watched(response, record)

    # The hot routes are plain Starlette routes: FastAPI's dependency machinery costs tens of
    # microseconds per request and these need none of it (docs/performance.md).
    for path in _HOT.values():
        api.add_route(f"/{path}", partial(handle, path=path), methods=["POST"])

    @api.get("/v1/models", dependencies=[Depends(check)])
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
