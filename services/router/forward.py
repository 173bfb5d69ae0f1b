"""Forwarding one OpenAI request to a replica, failing over before any byte is sent, and
holding it while its model is cold or asleep."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from services.router.balancer import order_replicas
from services.router.hold import Holder, Ticket
from services.router.routes import RouteTable
from shared.errors import ApiError, NoCapacity, UpstreamError, error_body
from shared.http import auth_headers, open_upstream, relay
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)

# A worker answering these has not started on the request: another replica may serve it.
_RETRYABLE = (502, 503)
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def sse_error(err: ApiError) -> bytes:
    """An error inside an event stream that has already begun (the status line is sent)."""
    return b"data: " + error_body(err.message, err.type, err.code, err.param) + b"\n\n"


class Forwarder:
    def __init__(
        self, table: RouteTable, store: Store, client: httpx.AsyncClient,
        holder: Holder, internal_token: str | None,
    ) -> None:
        self.table = table
        self.store = store
        self.client = client
        self.holder = holder
        self.inflight: Counter[str] = Counter()
        self._turn = itertools.count()
        self._auth = auth_headers(internal_token)

    async def handle(
        self, model: StoredModel, path: str, body: bytes, request_id: str, stream: bool
    ) -> Response:
        alias = model.spec.alias
        if self.table.replicas(alias):
            return await self.forward(alias, path, body, request_id)
        if model.hold is not None:
            raise NoCapacity(f"model '{alias}' was stopped manually; wake it with POST "
                             f"/admin/models/{alias}/wake", code="model_stopped")
        ticket = await self.holder.admit(model)
        try:
            # A streamed request that waits longer than one keepalive interval turns into an
            # event stream of comments; until then every outcome keeps its HTTP status.
            first = self.holder.settings.hold_keepalive_s if stream else ticket.remaining
            if await ticket.wait(first):
                await ticket.release()
                return await self.forward(alias, path, body, request_id)
            if not stream:
                raise await self.holder.timeout_error(ticket)
        except BaseException:
            await ticket.release()
            raise
        return StreamingResponse(
            self._held_stream(ticket, path, body, request_id),
            media_type="text/event-stream", headers=_SSE_HEADERS,
            background=BackgroundTask(ticket.release),
        )

    async def _held_stream(
        self, ticket: Ticket, path: str, body: bytes, request_id: str
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._held_chunks(ticket, path, body, request_id):
                yield chunk
        finally:
            await ticket.release()  # also when the client went away mid-wait

    async def _held_chunks(
        self, ticket: Ticket, path: str, body: bytes, request_id: str
    ) -> AsyncIterator[bytes]:
        keepalive = self.holder.settings.hold_keepalive_s
        try:
            while True:
                yield f": waiting for model '{ticket.alias}' to start\n\n".encode()
                if await ticket.wait(keepalive):
                    break
                if ticket.remaining <= 0:
                    yield sse_error(await self.holder.timeout_error(ticket))
                    return
            await ticket.release()
            upstream, worker = await self.open(ticket.alias, path, body, request_id)
        except ApiError as e:
            yield sse_error(e)
            return
        try:
            if upstream.status_code >= 400:
                raw = await upstream.aread()
                yield b"data: " + raw.strip() + b"\n\n"
                return
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            return  # bytes already went out: end the stream here, never glue a retry on
        finally:
            await upstream.aclose()
            self._done(worker)

    async def forward(self, alias: str, path: str, body: bytes, request_id: str) -> Response:
        upstream, worker = await self.open(alias, path, body, request_id)
        return relay(upstream, on_close=lambda: self._done(worker))

    async def open(
        self, alias: str, path: str, body: bytes, request_id: str
    ) -> tuple[httpx.Response, str]:
        """Send to the best replica, failing over to the next on connection errors or a
        502/503 from the worker. Returns the response (body unread) and its worker, counted
        in flight until the caller calls :meth:`_done`."""
        replicas = self.table.replicas(alias)
        order = order_replicas(sorted(replicas), self.inflight, next(self._turn))
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._auth}
        last: ApiError | None = None
        for i, worker in enumerate(order):
            url = f"{replicas[worker]}/proxy/{alias}/{path}"
            self.inflight[worker] += 1
            try:
                upstream = await open_upstream(self.client, "POST", url, body, headers)
            except UpstreamError as e:
                self._done(worker)
                logger.warning("replica %s of %s unreachable: %s", worker, alias, e.message)
                last = e
                continue
            except BaseException:
                self._done(worker)
                raise
            if upstream.status_code in _RETRYABLE and i + 1 < len(order):
                await upstream.aclose()
                self._done(worker)
                continue
            return upstream, worker
        raise last or NoCapacity(f"no replica of '{alias}' could take the request",
                                 retry_after_s=self.holder.settings.no_replica_retry_after_s)

    def _done(self, worker: str) -> None:
        self.inflight[worker] -= 1
        if self.inflight[worker] <= 0:
            del self.inflight[worker]
