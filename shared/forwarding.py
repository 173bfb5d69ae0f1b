"""The request hot path's HTTP client: one pooled aiohttp session per process.

aiohttp rather than httpx here, by measurement (docs/performance.md): httpx's connection pool
costs far more CPU per request under concurrency (encode/httpx#3215). Control-plane calls
(health checks, sleep/wake, the manager API) keep using httpx, where simplicity matters more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from shared.errors import UpstreamError, UpstreamTimeout, error_body

# Only these response headers of an upstream are worth passing on; hop-by-hop ones
# (connection, transfer-encoding, content-length of a re-chunked body) must not be.
PASS_HEADERS = ("content-type", "retry-after", "x-request-id")

_STREAM_BROKEN = b"data: " + error_body(
    "the replica serving this stream failed mid-way; the output above is incomplete",
    "upstream_error", "stream_interrupted") + b"\n\n"

Upstream = aiohttp.ClientResponse


class UpstreamClient:
    """Opens requests to upstreams and relays their answers, chunk by chunk."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        # Created on first use: a session must be made inside the running event loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def open(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send a request; the response comes back with its body not yet read.

        Connection failures raise :class:`UpstreamError` (nothing reached the client, so the
        caller may retry elsewhere); timeouts raise :class:`UpstreamTimeout`.
        """
        try:
            return await self._sess().request(method, url, data=body or None, headers=headers)
        except TimeoutError as e:
            raise UpstreamTimeout(f"upstream timed out: {type(e).__name__}") from e
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream unreachable: {type(e).__name__}",
                                code="upstream_unreachable") from e


async def read_all(upstream: Upstream) -> bytes:
    """The whole body; the connection goes back to the pool."""
    try:
        return await upstream.read()
    finally:
        upstream.release()


def finish(upstream: Upstream) -> None:
    """Give the connection back, or close it if the body was not read to its end: closing is
    what tells the upstream to abort a generation nobody will read."""
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def _chunks(upstream: Upstream, sse: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError):
        # Bytes already reached the client: never glue a retry onto a partial answer. An
        # event stream ends with an error event OpenAI clients raise; anything else is cut.
        if sse:
            yield _STREAM_BROKEN


def relay(upstream: Upstream, on_close: Callable[[], None] | None = None) -> StreamingResponse:
    """Pass an upstream response on as it arrives, never re-buffered or re-chunked.
    ``on_close`` runs once the response is over, however it ended."""
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
    sse = upstream.headers.get("content-type", "").startswith("text/event-stream")

    async def close() -> None:
        finish(upstream)
        if on_close is not None:
            on_close()

    return StreamingResponse(_chunks(upstream, sse), status_code=upstream.status,
                             headers=headers, background=BackgroundTask(close))
