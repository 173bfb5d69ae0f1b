"""Relaying an upstream answer through the ASGI app (the path that is not the fast lane:
held requests, and answers to requests the fast lane handed back)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.errors import ApiError
from shared.fastlane import PASS_HEADERS, STREAM_BROKEN
from shared.wire import Exchange

logger = logging.getLogger(__name__)


def headers_of(ex: Exchange, request_id: bytes | None = None) -> dict[str, str]:
    """The upstream headers that pass on; ``request_id`` replaces the upstream's own."""
    out = {k.decode("latin-1"): v.decode("latin-1") for k, v in ex.headers if k in PASS_HEADERS}
    if request_id is not None:
        out["x-request-id"] = request_id.decode("latin-1")
    return out


async def _chunks(ex: Exchange, sse: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in ex.chunks():
            yield chunk
    except ApiError:
        # Bytes already reached the client: never glue a retry onto a partial answer. An
        # event stream ends with an error event OpenAI clients raise; anything else is cut.
        if sse:
            yield STREAM_BROKEN


class Ending(StreamingResponse):
    """A streamed answer whose ``over`` callbacks run once it is over, however it ended:
    also when its body fails or its task is cancelled (a shutdown's timeout), both of which
    skip a Starlette background task, so an in-flight count, an admission slot or a key's
    concurrency slot would stay taken for the life of the process."""

    def __init__(self, content: AsyncIterator[bytes], *, status_code: int = 200,
                 headers: dict[str, str] | None = None, media_type: str | None = None,
                 over: Callable[[], None] | None = None) -> None:
        super().__init__(content, status_code=status_code, headers=headers,
                         media_type=media_type)
        self._over: list[Callable[[], None]] | None = [over] if over is not None else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            over, self._over = self._over, None
            for then in over or ():
                try:
                    then()
                except Exception:  # the others (a ticket, an upload) must still end
                    logger.exception("cleanup after a streamed answer failed")

    def then(self, then: Callable[[], None]) -> None:
        """Run ``then`` too once the answer is over (after what is already to run)."""
        if self._over is None:
            then()
        else:
            self._over.append(then)


def relay(
    ex: Exchange, on_close: Callable[[], None] | None = None, request_id: bytes | None = None,
) -> StreamingResponse:
    """Pass an upstream response on as it arrives, never re-buffered or re-chunked.
    ``on_close`` runs once the response is over, however it ended."""
    sse = (ex.header(b"content-type") or b"").startswith(b"text/event-stream")

    def over() -> None:
        ex.close()
        if on_close is not None:
            on_close()

    headers = headers_of(ex, request_id)
    if ex.length is not None:
        # Kept, so a relayed answer is framed as the engine framed it; one that ends short
        # is then cut (the connection closes), never passed off as complete.
        headers["content-length"] = str(ex.length)
    return Ending(_chunks(ex, sse), status_code=ex.status, headers=headers, over=over)


def when_over(response: Response, then: Callable[[], None]) -> None:
    """Run ``then`` once ``response`` is over: for a streamed answer however it ended (see
    :class:`Ending`); for any other, after its own background task, if any."""
    if isinstance(response, Ending):
        response.then(then)
        return
    before = response.background

    async def run() -> None:
        try:
            if before is not None:
                await before()
        finally:
            then()

    response.background = BackgroundTask(run)
