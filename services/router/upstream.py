"""Sending one request to the replicas of a model: choice, failover, circuit breaking.

A request moves to another replica only while nothing has reached the client: on a connection
error, a 500 from the engine or a 502/503/504 from the worker (streamed or not: the status
comes before any byte is sent on), or (non-streamed) a failure while reading an answer of at
most ``buffer_max`` bytes, which is read whole before it is sent on. A larger non-streamed
answer is relayed as it arrives, with back-pressure, so memory per request stays bounded;
it has no failover once its first byte is sent. An audio upload relayed as it arrives moves
only while what was sent of it is still kept (its first MAX_BODY_BYTES: :mod:`shared.upload`).
A streamed answer is relayed chunk by chunk;
a failure after its first byte ends it with an error event, never with a retry glued onto it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol

from starlette.responses import Response

from services.router.adapters import AdapterTable
from services.router.admission import Gate, Slot
from services.router.balancer import holders_first, order_replicas
from services.router.breaker import Breaker
from services.router.metrics import RequestRecord
from services.router.routes import RouteTable
from shared.errors import ApiError, NoCapacity, UpstreamError
from shared.forwarding import headers_of, relay
from shared.principal import ANONYMOUS, Principal
from shared.upload import Upload
from shared.wire import Exchange, Pool

logger = logging.getLogger(__name__)

# Nothing of these answers reaches the client, so another replica may serve the request: an
# engine 500 (its core died while its API server still answers), the worker's 502/504
# (engine unreachable or silent) and 503 (replica not ready).
_RETRYABLE = frozenset((500, 502, 503, 504))


@dataclass(frozen=True, slots=True)
class Call:
    alias: str
    path: str
    body: bytes
    request_id: str
    stream: bool
    affinity: str | None = None
    principal: Principal = ANONYMOUS
    # The start of the prompt, for prefix-aware balancing (services/router/prefix.py).
    prefix: str | None = None
    # A JSON body, or an audio upload's multipart/form-data with its boundary.
    content_type: bytes = b"application/json"
    # A LoRA adapter of the model ``alias`` (its base) that is to answer.
    adapter: str | None = None
    record: RequestRecord | None = None  # metrics and the access log (services/router/metrics)
    # An audio upload relayed as it arrives (``body`` is then its head): shared/upload.py.
    upload: Upload | None = None
    # The router asked for the stream's usage event (a key's request; shared/usage_strip.py):
    # it is taken out of the answer.
    strip_usage: bool = False


class InProcessWorker(Protocol):
    """The worker of this very process (services.node; services.worker.proxy.InProcess):
    its replicas are sent their requests by a call, not over HTTP."""

    worker_id: str
    requests: int  # sent by a call since the start

    async def send(self, alias: str, path: str, content_type: bytes, request_id: bytes,
                   traceparent: bytes | None, body: bytes
                   ) -> tuple[Exchange, Callable[[], None]]: ...


@dataclass(slots=True)
class Answer:
    """A replica's answer: read whole (``body``) or, for a streamed call or a large answer,
    still arriving on ``exchange``; then :meth:`Upstreams.finished` must be called once it
    is over."""

    worker: str
    exchange: Exchange
    body: bytes | None
    slot: Slot | None = None  # the model's admission slot, held until the answer ends
    ended: Callable[[], None] | None = None  # an in-process worker's end of the request


class Upstreams:
    def __init__(
        self, table: RouteTable, pool: Pool, internal_token: str | None,
        max_attempts: int, retry_backoff_s: float, breaker: Breaker, retry_after_s: int,
        buffer_max: int = 1 << 20, prefix_slack: float = 4,
        adapters: AdapterTable | None = None, *, admission: Gate,
        in_process: InProcessWorker | None = None,
    ) -> None:
        self.table = table
        self.pool = pool
        self.max_attempts = max_attempts
        self.backoff_s = retry_backoff_s
        self.breaker = breaker
        self.retry_after_s = retry_after_s
        self.buffer_max = buffer_max
        self.prefix_slack = prefix_slack
        self.admission = admission
        self.inflight: Counter[str] = Counter()
        self.adapters = adapters
        self.in_process = in_process
        self._auth = f"authorization: Bearer {internal_token}\r\n".encode() \
            if internal_token else b""

    def order(self, call: Call, slot: Slot | None = None) -> list[str]:
        replicas = self.table.replicas(call.alias)
        allowed = self.breaker.allowed(call.alias, sorted(replicas), time.monotonic())
        if slot is not None:  # a capped model: replicas below their share here first
            allowed = self.admission.below_share(slot, allowed)
        ordered = order_replicas(allowed, self.inflight, self.table.load(call.alias),
                                 call.affinity, prefix=call.prefix, slack=self.prefix_slack)
        if call.adapter is not None and self.adapters is not None:
            ordered = holders_first(ordered, self.adapters.holders(call.alias, call.adapter))
        return ordered

    async def send(self, call: Call) -> Response:
        """The answer to ``call`` as an ASGI response (the path for held requests)."""
        answer = await self.open(call)
        ex = answer.exchange
        if answer.body is not None:
            return Response(answer.body, ex.status, headers=headers_of(ex))
        return relay(ex, on_close=lambda: self.done(answer))

    async def open(self, call: Call) -> Answer:
        """The answer to ``call`` from the first replica that takes it, once the model has
        a free slot (:mod:`services.router.admission`); an answer still arriving keeps the
        slot until :meth:`done`."""
        cap = self.admission.cap(call.alias)
        if cap is None:
            return await self._open(call)
        slot = await self.admission.enter(call.alias, cap, call.principal)
        try:
            answer = await self._open(call, slot)
        except BaseException:
            self.admission.release(slot)
            raise
        if answer.body is None:
            answer.slot = slot
        else:
            self.admission.release(slot)
        return answer

    def done(self, answer: Answer) -> None:
        """An answer that was still arriving has ended (relayed, failed or abandoned)."""
        self.finished(answer.worker)
        if answer.ended is not None:
            answer.ended()
        if answer.slot is not None:
            self.admission.release(answer.slot)

    async def _open(self, call: Call, slot: Slot | None = None) -> Answer:
        last: ApiError | None = None
        record = call.record
        for attempt, worker in enumerate(self.order(call, slot)[: self.max_attempts]):
            began = perf_counter()  # replica and back-off time: not the router's own
            if attempt:
                await asyncio.sleep(self.backoff_s * attempt)
            url = self.table.replicas(call.alias).get(worker)
            if url is None:  # the replica went away while we backed off
                continue
            if slot is not None:
                self.admission.seat(slot, worker)
            try:
                answer = await self._attempt(worker, url, call)
            except _Retry as e:
                ejected = self.breaker.failure(call.alias, worker, time.monotonic())
                if record is not None:
                    record.attempt_failed(ejected, e.error.message)
                    record.upstream_s += perf_counter() - began
                logger.warning("replica %s of %s failed before answering (%s); %s", worker,
                               call.alias, e.error.message, "retrying" if attempt + 1 <
                               self.max_attempts else "giving up")
                last = e.error
                if call.upload is not None and not call.upload.replayable:
                    # What this replica got of the upload is no longer kept: no retry.
                    raise e.error from None
                continue
            if record is not None:
                record.answered(worker, perf_counter() - began)
                if answer.body is not None:
                    record.body(answer.body)
            return answer
        raise last or NoCapacity(f"no replica of '{call.alias}' could take the request",
                                 retry_after_s=self.retry_after_s)

    async def _attempt(self, worker: str, url: str, call: Call) -> Answer:
        traceparent = call.record.upstream_traceparent(worker) if call.record else None
        local = self.in_process
        if local is not None and (worker != local.worker_id or call.upload is not None
                                  or call.adapter is not None):
            local = None  # uploads and adapters take the worker's HTTP proxy, which has them
        ended: Callable[[], None] | None = None
        self.inflight[worker] += 1
        handed_over = False
        ex: Exchange | None = None
        try:
            try:
                if local is not None:
                    ex, ended = await local.send(
                        call.alias, call.path, call.content_type,
                        call.request_id.encode("latin-1"), traceparent, call.body)
                else:
                    ex = await self._send_http(url, call, traceparent)
            except UpstreamError as e:
                raise _Retry(e) from e
            except NoCapacity as e:  # in process: the worker's refusal, worded as its 503 is
                raise _Retry(NoCapacity(f"replica {worker} is not ready: {e.message}",
                                        retry_after_s=self.retry_after_s)) from e
            if ex.status in _RETRYABLE:
                raise _Retry(await self._refusal(worker, ex))
            content = None
            if not call.stream:
                try:
                    content = await ex.read_at_most(self.buffer_max)
                except UpstreamError as e:
                    raise _Retry(UpstreamError(f"reading the answer failed: {e.message}")) \
                        from e
            self.breaker.success(call.alias, worker)
            handed_over = content is None
            return Answer(worker, ex, content, ended=ended if handed_over else None)
        finally:
            if not handed_over:
                self.finished(worker)
                if ex is not None:
                    ex.close()  # cancelled mid-read: closing aborts the generation
                if ended is not None:
                    ended()

    async def _send_http(self, url: str, call: Call, traceparent: bytes | None) -> Exchange:
        """``call`` sent to the worker at ``url``, over HTTP, for its proxy."""
        headers = b"content-type: %s\r\nx-request-id: %s\r\n%s" % (
            call.content_type, call.request_id.encode("latin-1"), self._auth)
        if call.adapter is not None:
            headers += b"x-svllm-adapter: %s\r\n" % call.adapter.encode()
        if traceparent is not None:
            headers += b"traceparent: " + traceparent + b"\r\n"
        path = f"/proxy/{call.alias}/{call.path}".encode()
        if call.upload is None:
            return await self.pool.send(url, b"POST", path, headers, call.body)
        return await self.pool.send_stream(url, b"POST", path, headers, call.upload)

    async def _refusal(self, worker: str, ex: Exchange) -> ApiError:
        body = (await _read_quietly(ex))[:300].decode("utf-8", "replace")
        if ex.status == 503:
            return NoCapacity(f"replica {worker} is not ready: {body}",
                              retry_after_s=self.retry_after_s)
        return UpstreamError(f"replica {worker} failed ({ex.status}): {body}")

    def finished(self, worker: str) -> None:
        self.inflight[worker] -= 1
        if self.inflight[worker] <= 0:
            del self.inflight[worker]


class _Retry(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def _read_quietly(ex: Exchange) -> bytes:
    """The start of a refusal's body, for the log and the error; never a large one whole."""
    try:
        return await ex.read_at_most(4096) or b""
    except ApiError:
        return b""
    finally:
        ex.close()
