"""The OpenAI-compatible API: every engine path of :mod:`shared.engine_api` (chat,
completions, embeddings, responses, rerank, score, tokenize, pooling, classify, audio) and
/v1/models."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from services.router.adapters import AdapterTable
from services.router.admission import VLLM_PRIORITY, EnginePriority
from services.router.forward import Forwarder
from services.router.keyring import KeyRing
from services.router.limiter import (
    CAP_FIELDS,
    Limiter,
    Ticket,
    completion_cap,
    estimate,
    usage_of_body,
    usage_of_stream,
)
from services.router.metrics import Recorder, RequestRecord
from services.router.prefix import prefix_key
from services.router.routes import RouteTable
from services.router.upstream import Answer, Call, Upstreams
from shared.apikeys import KeyRecord
from shared.engine_api import FORM_PATHS, JSON_PATHS, PROMPT_PATHS, not_served, serves
from shared.errors import ApiError, BadRequest, ModelNotFound, NotFound, Unauthorized, clip
from shared.fastlane import Handler, Lane, Picker, keep_tail, pass_headers, request_id_of
from shared.forwarding import when_over
from shared.http import (
    ClientGone,
    body_stream,
    cancel_on_disconnect,
    json_response,
    parse_object,
    read_body,
)
from shared.logs import REQUEST_ID
from shared.models import is_valid_name
from shared.principal import ANONYMOUS
from shared.store import StoredModel
from shared.upload import Upload, read_fields
from shared.usage_strip import USAGE_OPTION_ENGINES, UsageStrip, ask_for_usage

# nginx's status for a request its client closed: no answer was sent.
CLIENT_GONE = 499


@dataclass(frozen=True, slots=True)
class KeyGate:
    """Who may call /v1 (the key ring) and how much (the limiter)."""

    ring: KeyRing
    limiter: Limiter
    default_max_tokens: int

    async def admit(self, rec: KeyRecord | None, call: Call, data: dict[str, Any]
                    ) -> tuple[Ticket | None, Call]:
        """The key's ticket (None: no key) and the call to send, capped (below)."""
        if rec is None:
            return None, call
        # A LoRA adapter's request is booked under the adapter's name, and limited by the
        # model limits of either name (its base's GPUs serve it).
        name, base = (call.adapter, call.alias) if call.adapter else (call.alias, None)
        fields = CAP_FIELDS.get(call.path)
        changed = False
        if fields is not None and completion_cap(data, call.path) is None and any(
                b.tokens for b in self.limiter.buckets(rec, name, base)):
            # A key limited in tokens gets what it reserves: without a cap the engine would
            # write up to the model's context, far past the reservation. So the default cap
            # is sent.
            data[fields[-1]] = self.default_max_tokens
            changed = True
        reserved = estimate(data, len(call.body), call.path, self.default_max_tokens)
        ticket = await self.limiter.admit(rec, name, reserved, base)
        if changed or call.strip_usage:  # the usage asked for (_prepare): sent with it
            call = replace(call, body=orjson.dumps(data))
        return ticket, call

    def finish(self, ticket: Ticket | None, status: int, usage: tuple[int, int] | None
               ) -> None:
        if ticket is None:
            return
        failed = status >= 400 and status != CLIENT_GONE
        if usage is None:  # no usage in the answer: the estimate stands (nothing on errors)
            self.limiter.finish(ticket, used=0 if failed else None, error=failed)
        else:
            self.limiter.finish(ticket, used=usage[0] + usage[1], prompt=usage[0],
                                completion=usage[1], error=failed)


def _header_bytes(headers: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")


# The JSON POST paths, all on the fast lane: one dict lookup picks them.
_HOT = {f"/{p}": p for p in JSON_PATHS}


async def _model(
    table: RouteTable, name: object, path: str, rec: KeyRecord | None,
    adapters: AdapterTable | None = None,
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
    if model is None or (rec is not None and not rec.allows(name)):
        # A model the key may not use is answered exactly as one that does not exist.
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
    rec: KeyRecord | None, by_priority: EnginePriority, prefix_chars: int = 0,
    adapters: AdapterTable | None = None, record: RequestRecord | None = None,
) -> tuple[StoredModel, Call, dict[str, Any]]:
    # Only `model` (and what balancing uses) is read; the body is forwarded untouched.
    data = parse_object(body)
    model, adapter = await _model(table, data.get("model"), path, rec, adapters)
    user = data.get("user")
    affinity = session or (user if isinstance(user, str) else None)
    prefix = prefix_key(data, path, prefix_chars) \
        if prefix_chars and not affinity and path in PROMPT_PATHS else None
    # An adapter's request goes to its base model's replicas (the body still names the
    # adapter: the engine serves it under that name).
    stream = data.get("stream") is True
    # A key's stream: its usage event is what corrects the key's reservation and counts its
    # usage, so it is asked for when the client did not (``data`` changed; the key's gate
    # sends it) and taken out of the answer.
    strip = stream and rec is not None and model.spec.engine in USAGE_OPTION_ENGINES \
        and ask_for_usage(data, path)
    call = Call(model.spec.alias, path, body, request_id, stream,
                affinity or None, rec.principal if rec is not None else ANONYMOUS,
                prefix=prefix, adapter=adapter, record=record, strip_usage=strip)
    if record is not None:
        record.alias, record.stream, record.principal = model.spec.alias, stream, call.principal
    if by_priority(model.spec):
        # The engine schedules by priority: it gets the key's, whatever the client sent.
        data["priority"] = VLLM_PRIORITY[call.principal.priority]
        call = replace(call, body=orjson.dumps(data))
    return model, call, data


async def _prepare_form(
    table: RouteTable, fields: dict[str, str], upload: Upload, content_type: str, path: str,
    request_id: str, rec: KeyRecord | None, adapters: AdapterTable | None = None,
    record: RequestRecord | None = None,
) -> tuple[StoredModel, Call, dict[str, Any]]:
    """An audio upload: its leading `model` (and `stream`) fields read, the body relayed
    untouched as it arrives (shared/upload.py)."""
    model, adapter = await _model(table, fields.get("model"), path, rec, adapters)
    stream = fields.get("stream", "").lower() == "true"
    call = Call(model.spec.alias, path, bytes(upload.head), request_id, stream,
                principal=rec.principal if rec is not None else ANONYMOUS,
                content_type=content_type.encode("latin-1"), adapter=adapter, record=record,
                upload=upload)
    if record is not None:
        record.alias, record.stream, record.principal = model.spec.alias, stream, call.principal
    return model, call, {}


async def _upload(
    request: Request, table: RouteTable, path: str, rid: str, rec: KeyRecord | None,
    adapters: AdapterTable | None, record: RequestRecord, limit: int, audio_limit: int,
) -> tuple[StoredModel, Call, dict[str, Any]]:
    """An audio upload, read only as far as its leading fields (shared/upload.py)."""
    content_type = request.headers.get("content-type", "")
    fields, upload = await read_fields(body_stream(request), content_type,
                                       request.headers.get("content-length"), audio_limit, limit)
    return await _prepare_form(table, fields, upload, content_type, path, rid, rec, adapters,
                               record)


def fast_lane(table: RouteTable, upstreams: Upstreams, limit: int, gate: KeyGate,
              recorder: Recorder, prefix_chars: int = 0,
              adapters: AdapterTable | None = None) -> Picker:
    """The steady state on the fast lane (:mod:`shared.fastlane`): a model with a replica
    serving. A cold, sleeping or stopped model, a wrong API key, and a body the lane does
    not take, go to the ASGI routes below, which hold the request or explain the error.
    With API keys: a dict lookup for the key, one EVALSHA for its limits, and go."""
    by_priority = EnginePriority()

    async def handle(lane: Lane) -> bool:
        try:
            rec = gate.ring.check(lane.header(b"authorization"))
        except Unauthorized:
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
            model, call, data = await _prepare(
                table, body, _HOT[lane.path], rid_text,
                session.decode("latin-1") if session else None, rec, by_priority, prefix_chars,
                adapters, record)
            if model.hold is not None or not table.replicas(call.alias):
                status = 0  # the ASGI route takes it, with a record of its own
                return False
            status = await _serve(lane, upstreams, gate, rec, call, data, record)
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


async def _serve(
    lane: Lane, upstreams: Upstreams, gate: KeyGate, rec: KeyRecord | None, call: Call,
    data: dict[str, Any], record: RequestRecord,
) -> int:
    """Send ``call`` on the lane within the key's limits; the answer's status."""
    ticket, call = await gate.admit(rec, call, data)
    if ticket is None:
        answer = await upstreams.open(call)
        await _send(lane, upstreams, answer, record)
        return answer.exchange.status
    lane.extra = _header_bytes(ticket.headers)
    lane.tail = bytearray() if call.stream else None
    lane.strip = UsageStrip() if call.strip_usage else None
    opened: Answer | None = None
    status = 502  # failed before an answer: refunded
    try:
        opened = await upstreams.open(call)
        await _send(lane, upstreams, opened, record)
        return opened.exchange.status
    except asyncio.CancelledError:
        # The client went away while its answer was made: the engine worked on it, so its
        # reservation stands; a refund would let a key burn GPU time for free.
        status = CLIENT_GONE
        raise
    finally:
        if opened is not None:
            status = opened.exchange.status
        body = opened.body if opened is not None else None
        gate.finish(ticket, status, usage_of_body(body) if body is not None else
                    usage_of_stream(bytes(lane.tail)) if lane.tail else None)


async def _send(lane: Lane, upstreams: Upstreams, answer: Answer, record: RequestRecord,
                ) -> None:
    ex = answer.exchange
    rid = lane.request_id
    if answer.body is not None:
        lane.respond(ex.status, pass_headers(ex.headers, rid) + lane.extra, answer.body)
        return
    lane.watch = record
    try:
        await lane.relay(ex)
    finally:
        upstreams.done(answer)


class Watched(Response):
    """An answer sent through the ASGI app, with its record told of its status and chunks
    and finished once it is over, however it ended."""

    def __init__(self, inner: Response, record: RequestRecord,
                 tail: bytearray | None = None, strip: UsageStrip | None = None) -> None:
        self.inner = inner
        self.record = record
        self.status_code = inner.status_code
        self.tail = tail  # a streamed answer of a key: its last bytes (the usage chunk)
        self.strip = strip  # the usage event the router asked for, taken out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        status = 499
        strip = self.strip

        async def watched(message: Message) -> None:
            nonlocal status, strip
            if message["type"] == "http.response.start":
                status = message["status"]
                if strip is not None and not _event_stream(message.get("headers", ())):
                    strip = None  # an answer framed by its length goes as it is
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                record.chunk(chunk)
                if self.tail is not None and chunk:
                    keep_tail(self.tail, chunk)
                if strip is not None:
                    out = strip.pass_on(chunk, last=not message.get("more_body", False))
                    if out != chunk:
                        message = {**message, "body": out}
            await send(message)

        try:
            await self.inner(scope, receive, watched)
        finally:
            record.finish(status)


def _event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A response head of an event stream without a length (chunks as they come)."""
    sse = False
    for k, v in headers:
        if k.lower() == b"content-length":
            return False
        if k.lower() == b"content-type":
            sse = v.startswith(b"text/event-stream")
    return sse


def _ticketed(gate: KeyGate, ticket: Ticket, response: Response) -> bytearray | None:
    """The key's headers on ``response``, and its ticket finished with the usage when the
    answer is over; for a streamed answer, the buffer its last bytes go to (the usage
    chunk: a held request is corrected like one on the fast lane)."""
    response.headers.update(ticket.headers)
    content = getattr(response, "body", None)
    if isinstance(content, bytes) and content:  # read whole
        gate.finish(ticket, response.status_code, usage_of_body(content))
        return None
    tail = bytearray()
    when_over(response, partial(_finish_stream, gate, ticket, response.status_code, tail))
    return tail


def _finish_stream(gate: KeyGate, ticket: Ticket, status: int, tail: bytearray) -> None:
    gate.finish(ticket, status, usage_of_stream(bytes(tail)) if tail else None)


def build_routes(
    table: RouteTable, forwarder: Forwarder, limit: int, gate: KeyGate, recorder: Recorder,
    admin_token: str | None = None, prefix_chars: int = 0,
    adapters: AdapterTable | None = None, audio_limit: int | None = None,
) -> APIRouter:
    # ``limit`` bounds JSON bodies; ``audio_limit`` (MAX_AUDIO_BYTES) uploads, which are
    # relayed as they arrive instead of read whole.
    api = APIRouter()
    # The admin token is accepted too (the console's playground sends it); such requests
    # leave the fast lane, which does not know it, for this path.
    extra = (admin_token.encode(),) if admin_token else ()
    by_priority = EnginePriority()

    async def check(request: Request) -> KeyRecord | None:
        # Starlette decodes header bytes as latin-1, so this gives back the bytes sent.
        header = request.headers.get("authorization", "").encode("latin-1")
        return await gate.ring.admit(header, *extra)

    async def handle(request: Request, *, path: str) -> Response:
        given = request.headers.get("x-request-id")
        rid = request_id_of(given.encode("latin-1") if given else None).decode("latin-1")
        request.state.request_id = rid  # error answers carry it too (shared/errors.py)
        REQUEST_ID.set(rid)
        traceparent = request.headers.get("traceparent")
        record = recorder.start(rid, traceparent.encode("latin-1") if traceparent else None)
        try:
            rec = await check(request)
            if path in FORM_PATHS:
                model, call, data = await _upload(request, table, path, rid, rec, adapters,
                                                  record, limit, audio_limit or limit)
            else:
                body = await read_body(request, limit)
                model, call, data = await _prepare(
                    table, body, path, rid, request.headers.get("x-session-id"), rec,
                    by_priority, prefix_chars, adapters, record)
            ticket, call = await gate.admit(rec, call, data)
        except ApiError as e:
            record.finish(e.status, e.code)
            raise
        except Exception:
            record.finish(500, "internal_error")
            raise
        try:
            response = await _forward(request, forwarder, model, call)
        except asyncio.CancelledError:
            gate.finish(ticket, CLIENT_GONE, None)  # the engine worked on it: charged
            record.finish(CLIENT_GONE)
            raise
        except ApiError as e:
            gate.finish(ticket, 502, None)
            record.finish(e.status, e.code)
            raise
        except BaseException:
            gate.finish(ticket, 502, None)
            record.finish(500, "internal_error")
            raise
        tail = _ticketed(gate, ticket, response) if ticket is not None else None
        response.headers["x-request-id"] = rid
        if response.status_code == 499:  # the client went away: nothing is sent
            record.finish(499)
            return response
        return Watched(response, record, tail,
                       UsageStrip() if call.strip_usage and tail is not None else None)

    # The hot routes are plain Starlette routes: FastAPI's dependency machinery costs tens of
    # microseconds per request and these need none of it (docs/performance.md).
    for path in (*_HOT.values(), *FORM_PATHS):
        api.add_route(f"/{path}", partial(handle, path=path), methods=["POST"])

    _model_routes(api, table, check, adapters)
    return api


def _model_routes(
    api: APIRouter, table: RouteTable, check: Callable[[Request], Awaitable[KeyRecord | None]],
    adapters: AdapterTable | None,
) -> None:
    """GET /v1/models and /v1/models/{alias}: what the caller's key may use."""

    def card(alias: str, m: StoredModel) -> dict[str, object]:
        return {"id": alias, "object": "model", "created": int(m.created_at),
                "owned_by": "svllm", "engine": m.spec.engine, "model_name": m.spec.model_name,
                "serving": bool(table.replicas(alias))}

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        rec = await check(request)
        data = [card(alias, m) for alias, m in sorted(table.models.items())]
        if adapters is not None:
            data += _adapter_cards(table, adapters)
        return json_response({"object": "list", "data": [
            c for c in data if rec is None or rec.allows(str(c["id"]))]})

    @api.get("/v1/models/{alias}")
    async def model(request: Request, alias: str) -> Response:
        rec = await check(request)
        found = await table.model(alias) if is_valid_name(alias) else None
        allowed = rec is None or rec.allows(alias)
        if found is None and adapters is not None and allowed:
            if is_valid_name(alias):  # one registered through another router a moment ago
                await adapters.lookup(alias)
            cards = [c for c in _adapter_cards(table, adapters) if c["id"] == alias]
            if cards:
                return json_response(cards[0])
        if found is None or not allowed:
            # A model the key may not use is answered exactly as one that does not exist.
            raise ModelNotFound(f"The model `{clip(alias)}` does not exist.", param="model")
        return json_response(card(alias, found))


async def _forward(request: Request, forwarder: Forwarder, model: StoredModel,
                   call: Call) -> Response:
    if call.upload is not None:
        # The body is read while it is sent on, so no disconnect watcher may read the
        # request meanwhile; a client gone mid-upload ends the read with ClientGone.
        try:
            response = await forwarder.handle(model, call)
        except ClientGone:
            call.upload.close()
            return Response(status_code=499)
        except BaseException:
            call.upload.close()
            raise
        when_over(response, call.upload.close)
        return response
    if call.stream:
        # Once streaming, Starlette cancels the relay when the client goes away.
        return await forwarder.handle(model, call)
    try:
        return await cancel_on_disconnect(request, forwarder.handle(model, call))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; for the logs (nginx's)
