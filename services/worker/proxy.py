"""Forwarding /proxy/{alias}/{path} to the local engine, for the engine paths clients need.

Two entrances, one behaviour: :func:`fast_handler` serves the common case on the fast lane
(:mod:`shared.fastlane`) and hands anything else (a wrong token, a path not proxied, a model
not serving here, a chunked or oversized body) to :func:`forward` in the ASGI app, which
explains the error. A third, :class:`InProcess`, is the same proxy called by a router in this
very process (services.node), without the HTTP hop between them.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable

from fastapi import Request
from starlette.responses import Response

from services.worker.lora import ADAPTER_HEADER, Lease, LoraManager
from services.worker.supervisor import Supervisor
from shared.engine_api import FORM_PATHS, SERVED_BY
from shared.errors import NoCapacity, NotFound, clip
from shared.fastlane import Handler, Lane, Picker, new_request_id, request_id_of
from shared.forwarding import relay
from shared.http import ClientGone, body_stream, cancel_on_disconnect, read_body
from shared.logs import REQUEST_ID
from shared.tracing import Span, Tracing, valid_traceparent
from shared.upload import Upload, over_limit
from shared.wire import Exchange, Pool

logger = logging.getLogger(__name__)

# The engine's other endpoints (/sleep, /wake_up, /collective_rpc ...) are not for clients:
# vLLM leaves them unauthenticated, so only the client paths of shared/engine_api.py pass.
ALLOWED: dict[str, str] = {**dict.fromkeys(SERVED_BY, "POST"), "v1/models": "GET"}
_FORWARD_HEADERS = (b"content-type", b"accept")
_ADAPTER = ADAPTER_HEADER.encode()


def engine_request_id(given: bytes | None, uuid_ids: bool) -> bytes:
    """The id the engine gets and the answer carries: the caller's valid id (the router's,
    which is its client's), else a fresh one; also fresh where the engine insists on UUIDs
    and the caller's is not one."""
    rid = request_id_of(given)
    if uuid_ids and not _is_uuid(rid):
        rid = new_request_id().encode()
    return rid


def forward_headers(get: Callable[[bytes], bytes | None], request_id: bytes,
                    traceparent: bytes | None = None) -> bytes:
    """The request headers the engine gets: content type, accept, the request id, and the
    W3C traceparent when there is one."""
    out = [h + b": " + v + b"\r\n" for h in _FORWARD_HEADERS if (v := get(h)) is not None]
    out.append(b"x-request-id: " + request_id + b"\r\n")
    if traceparent is not None:
        out.append(b"traceparent: " + traceparent + b"\r\n")
    return b"".join(out)


def trace(tracing: Tracing | None, given: bytes | None, alias: str, request_id: bytes
          ) -> tuple[bytes | None, Span | None]:
    """The traceparent the engine gets (the caller's, valid, as it is; with tracing, that of
    a new "worker proxy" span under it) and that span, to end once the answer is over."""
    traceparent = valid_traceparent(given)
    if tracing is None:
        return traceparent, None
    span = tracing.span("worker proxy", traceparent,
                        {"svllm.model": alias, "svllm.request_id": request_id.decode("latin-1")})
    return span.traceparent(), span


def not_serving(supervisor: Supervisor, alias: str) -> NoCapacity:
    """The refusal of a request for a model this worker does not serve now (the router's
    failover takes it as "replica not ready")."""
    inst = supervisor.instances.get(alias)
    state = inst.state.value if inst else "not assigned here"
    return NoCapacity(f"model '{clip(alias)}' is not serving on this worker ({state})",
                      code="replica_not_ready")


def _is_uuid(value: bytes) -> bool:
    try:
        uuid.UUID(value.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True
PREFIX = "/proxy/"


def tag(request: Request) -> bytes:
    """The request's id, from the caller's valid ``x-request-id`` or new; kept on the
    request so that every answer carries it, errors included (shared/errors.py)."""
    given = request.headers.get("x-request-id")
    rid = request_id_of(given.encode("latin-1") if given else None)
    request.state.request_id = rid.decode("latin-1")
    return rid


async def forward(
    request: Request, alias: str, path: str, supervisor: Supervisor, pool: Pool, limit: int,
    loras: LoraManager | None = None,
    tracing: Tracing | None = None, audio_limit: int | None = None,
) -> Response:
    """``limit`` bounds JSON bodies, read whole; an audio upload is relayed to the engine as
    it arrives, within ``audio_limit``."""
    method = ALLOWED.get(path)
    rid = tag(request)
    if method is None or method != request.method:
        raise NotFound(f"path '/{clip(path)}' is not proxied")
    engine = supervisor.serving(alias)
    if engine is None:
        raise not_serving(supervisor, alias)
    body, upload = await _body_of(request, path, method, limit, audio_limit or limit)

    def get(name: bytes) -> bytes | None:
        value = request.headers.get(name.decode())
        return value.encode("latin-1") if value else None

    rid = engine_request_id(rid, engine.launch.uuid_request_ids)
    request.state.request_id = rid_text = rid.decode("latin-1")
    REQUEST_ID.set(rid_text)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("proxying %s /%s", alias, path)
    given = request.headers.get("traceparent")
    traceparent, span = trace(tracing, given.encode("latin-1") if given else None, alias, rid)
    headers = forward_headers(get, rid, traceparent)
    # A request for a LoRA adapter of this model: loaded first if it is not (held like a
    # cold start), and kept from eviction until the answer is over.
    adapter = request.headers.get(ADAPTER_HEADER)
    lease: Lease | None = None
    if adapter and loras is not None:
        try:
            lease = await loras.acquire(alias, supervisor.instances[alias].model.spec, engine,
                                        adapter)
        except BaseException:
            if span is not None:
                span.end()
            raise
    # In flight from here until the response is over: the idle clock must not run meanwhile.
    supervisor.begin(alias)

    def done() -> None:
        supervisor.end(alias)
        if lease is not None:
            lease.release()
        if span is not None:
            span.end()

    try:
        ex = await _send(request, pool, engine.base_url, method, path, headers, body, upload)
    except ClientGone:
        done()
        return Response(status_code=499)
    except BaseException:
        done()
        raise
    finally:
        if upload is not None:
            upload.close()
    return relay(ex, on_close=done, request_id=rid)


async def _body_of(request: Request, path: str, method: str, limit: int, audio_limit: int,
                   ) -> tuple[bytes, Upload | None]:
    """A JSON body read whole, or an upload to relay as it arrives."""
    if path in FORM_PATHS:
        length = over_limit(request.headers.get("content-length"), audio_limit)
        return b"", Upload(body_stream(request), audio_limit, length)
    return (await read_body(request, limit) if method == "POST" else b""), None


async def _send(request: Request, pool: Pool, base_url: str, method: str, path: str,
                headers: bytes, body: bytes, upload: Upload | None) -> Exchange:
    target = b"/" + path.encode()
    if upload is not None:
        # Read while it is sent on: no disconnect watcher may read the request meanwhile
        # (a router gone mid-upload ends the read with ClientGone).
        return await pool.send_stream(base_url, method.encode(), target, headers, upload)
    # A non-streamed answer comes whole after the generation: if the router hangs up
    # meanwhile, closing the engine connection is what aborts the generation.
    return await cancel_on_disconnect(
        request, pool.send(base_url, method.encode(), target, headers, body))


def fast_handler(supervisor: Supervisor, pool: Pool, token: str | None, limit: int,
                 tracing: Tracing | None = None) -> Handler:
    expected = f"Bearer {token}".encode() if token else None

    async def handle(lane: Lane) -> bool:
        alias, _, path = lane.path[len(PREFIX):].partition("/")
        method = ALLOWED.get(path)
        if method != lane.method or path in FORM_PATHS:  # uploads: streamed by forward()
            return False
        if expected is not None and not hmac.compare_digest(
                lane.header(b"authorization") or b"", expected):
            return False
        engine = supervisor.serving(alias)
        if engine is None or lane.header(_ADAPTER) is not None:  # adapters: see forward()
            return False
        body = await lane.read_body(limit) if method == "POST" else b""
        if body is None:
            return False
        lane.request_id = rid = engine_request_id(lane.header(b"x-request-id"),
                                                  engine.launch.uuid_request_ids)
        REQUEST_ID.set(rid.decode("latin-1"))  # this request's task: its log lines carry it
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("proxying %s /%s", alias, path)
        traceparent, span = trace(tracing, lane.header(b"traceparent"), alias, rid)
        headers = forward_headers(lane.header, rid, traceparent)
        supervisor.begin(alias)
        try:
            ex = await pool.send(engine.base_url, lane.method.encode(), b"/" + path.encode(),
                                 headers, body)
            await lane.relay(ex)
        finally:
            supervisor.end(alias)
            if span is not None:
                span.end()
        return True

    return handle


class InProcess:
    """This worker's proxy for a router in the same process (services.node): what
    :func:`forward` does for a JSON request, called instead of sent over HTTP. The engine and
    the answer are the same; what goes is one hop (a loopback connection, a request parsed
    and an answer relayed by another process), the internal token (nothing crosses a socket
    to check it on) and the worker's refusals in HTTP form (a model not serving here raises
    the same NoCapacity, which the router's failover treats as the worker's 503)."""

    def __init__(self, worker_id: str, supervisor: Supervisor, pool: Pool,
                 tracing: Tracing | None = None) -> None:
        self.worker_id = worker_id
        self.supervisor = supervisor
        # Its own, timed out as the router's; the health check hears from it as from the
        # worker's (an engine answering requests is not hung).
        self.pool = pool
        self.tracing = tracing
        self.requests = 0  # sent in process since the start, for /health and tests

    async def send(self, alias: str, path: str, content_type: bytes, request_id: bytes,
                   traceparent: bytes | None, body: bytes
                   ) -> tuple[Exchange, Callable[[], None]]:
        """The engine's answer to a JSON request for ``alias``, still arriving, and what to
        call once it is over (the idle clock and in-flight count run until then)."""
        if ALLOWED.get(path) != "POST" or path in FORM_PATHS:
            raise NotFound(f"path '/{clip(path)}' is not proxied in process")
        engine = self.supervisor.serving(alias)
        if engine is None:
            raise not_serving(self.supervisor, alias)
        rid = engine_request_id(request_id, engine.launch.uuid_request_ids)
        parent, span = trace(self.tracing, traceparent, alias, rid)
        headers = forward_headers(lambda h: content_type if h == b"content-type" else None,
                                  rid, parent)
        self.supervisor.begin(alias)
        self.requests += 1
        ended = False

        def done() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.supervisor.end(alias)
                if span is not None:
                    span.end()

        try:
            ex = await self.pool.send(engine.base_url, b"POST", b"/" + path.encode(), headers,
                                      body)
        except BaseException:
            done()
            raise
        return ex, done


def picker(handler: Handler) -> Picker:
    def pick(method: str, path: str) -> Handler | None:
        return handler if path.startswith(PREFIX) else None

    return pick
