"""Serving one OpenAI request: straight to a replica when one serves, or held while the model
is cold or asleep (see :mod:`services.router.hold`), then sent on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from redis.exceptions import RedisError
from starlette.responses import Response

from services.router.hold import Holder, Ticket
from services.router.routes import RouteTable
from services.router.upstream import Answer, Call, Upstreams
from shared.errors import ApiError, NoCapacity, UpstreamError, sse_error, store_error
from shared.fastlane import STREAM_BROKEN
from shared.forwarding import Ending
from shared.store import StoredModel

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# An error answer passed on inside an event stream is read whole: never a large one.
_ERROR_MAX = 1 << 16


class Forwarder:
    def __init__(self, table: RouteTable, upstreams: Upstreams, holder: Holder) -> None:
        self.table = table
        self.upstreams = upstreams
        self.holder = holder

    async def handle(self, model: StoredModel, call: Call) -> Response:
        alias = model.spec.alias
        # Before the replicas: a stopped model's routes go only once its worker has stopped
        # the engine, and a request meanwhile was served, where the README promises 503.
        if model.hold is not None:
            raise NoCapacity(f"model '{alias}' was stopped manually; wake it with POST "
                             f"/admin/models/{alias}/wake", code="model_stopped")
        if self.table.replicas(alias):
            return await self.upstreams.send(call)
        ticket = await self.holder.admit(model)
        if call.record is not None:
            call.record.hold_begins()
        try:
            # A streamed request that waits longer than one keepalive interval turns into an
            # event stream of comments; until then every outcome keeps its HTTP status. Not
            # an upload: its body is still to be read, and an event stream's disconnect
            # watcher would read it.
            waits = call.stream and call.upload is None
            first = self.holder.settings.hold_keepalive_s if waits else ticket.remaining
            if await ticket.wait(first):
                await ticket.release()
                if call.record is not None:
                    call.record.hold_ends()
                return await self.upstreams.send(call)
            if not waits:
                raise await self.holder.timeout_error(ticket)
        except BaseException:
            await ticket.release()
            raise
        # The ticket is released by the stream once it ends, or here when it never began
        # or was cancelled (a Starlette background task would be skipped then).
        return Ending(self._held_stream(ticket, call), media_type="text/event-stream",
                      headers=_SSE_HEADERS, over=ticket.release_soon)

    async def _held_stream(self, ticket: Ticket, call: Call) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._held_chunks(ticket, call):
                yield chunk
        finally:
            # Also when the client went away mid-wait: Starlette then cancels this stream's
            # task scope, which would cut an awaited release short at its first await
            # (the queue entry left to its TTL, filling the hold queue).
            ticket.release_soon()

    async def _held_chunks(self, ticket: Ticket, call: Call) -> AsyncIterator[bytes]:
        keepalive = self.holder.settings.hold_keepalive_s
        try:
            while True:
                yield f": waiting for model '{ticket.alias}' to start\n\n".encode()
                if await ticket.wait(keepalive):
                    break
                if ticket.remaining <= 0:
                    error = await self.holder.timeout_error(ticket)
                    if call.record is not None:
                        call.record.code = error.code
                    yield sse_error(error)
                    return
            await ticket.release()
            if call.record is not None:
                call.record.hold_ends()
            answer = await self.upstreams.open(call)
        except (ApiError, RedisError) as e:
            # The stream's status (200) was sent already: the error is its last event.
            error = e if isinstance(e, ApiError) else store_error(e)
            if call.record is not None:
                call.record.code = error.code
            yield sse_error(error)
            return
        async for chunk in self._body(answer):
            yield chunk

    async def _body(self, answer: Answer) -> AsyncIterator[bytes]:
        """The relayed answer of a streamed call, inside an event stream already begun: an
        error status becomes one error event, since the stream's own status line was sent."""
        ex = answer.exchange
        try:
            if ex.status < 400:
                async for chunk in ex.chunks():
                    yield chunk
            else:
                error = await ex.read_at_most(_ERROR_MAX)
                yield b"data: " + error.strip() + b"\n\n" if error is not None else \
                    sse_error(UpstreamError(f"the replica answered {ex.status} with an error "
                                            f"of over {_ERROR_MAX} bytes"))
        except ApiError:
            yield STREAM_BROKEN
        finally:
            ex.close()
            self.upstreams.done(answer)
