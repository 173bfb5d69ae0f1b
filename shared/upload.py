"""A request body relayed upstream while it arrives (audio uploads), instead of read whole.

The router reads an upload's first pieces itself (its leading form fields name the model),
then sends those and pulls the rest from the client only as the upstream connection takes it,
so one upload costs a few socket reads of memory whatever its size. The worker does the same
towards the engine. The size limit is enforced as the bytes arrive.

What was read before sending began (``head``) is kept, and so are the pieces sent after it
while they total at most ``keep`` bytes (the router keeps MAX_BODY_BYTES, what it would hold
of a JSON body; the pieces are the very objects sent, not copies): a replica that fails
before more was sent can be tried again with the same body. Past ``keep`` the pieces are let
go (``replayable`` turns False) and a failure is final.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.errors import PayloadTooLarge
from shared.multipart import FieldScanner, boundary_of


class Upload:
    def __init__(self, source: AsyncIterator[bytes], limit: int, length: int | None,
                 keep: int = 0) -> None:
        self._source = source
        self.limit = limit
        self.length = length  # the declared Content-Length; None: chunked
        self.keep = keep
        self.head = bytearray()
        self.received = 0  # bytes read from the client so far
        self.taken = 0  # bytes sent upstream after the head
        self.kept: list[bytes] = []  # the pieces after the head, while they are kept
        self.replayable = True  # the whole body sent so far is at hand: a retry can send it
        self.ended = False
        self._next: asyncio.Future[bytes] | None = None

    async def extend_head(self) -> bytes:
        """Read the next piece into the head; b"" once the body has ended."""
        data = await self._pull()
        self.head += data
        return data

    async def next_piece(self, answered: asyncio.Future[None]) -> bytes | None:
        """The next piece to send on; None once the body ended, or as soon as ``answered``
        is done (the upstream answered, or failed, before taking all of it): a piece being
        read meanwhile is kept for whoever asks next, so it is never lost between tries."""
        if self.ended:
            return None
        if self._next is None:
            self._next = asyncio.ensure_future(self._pull())
        if not self._next.done():
            await asyncio.wait((self._next, answered), return_when=asyncio.FIRST_COMPLETED)
            if not self._next.done():
                return None
        pending, self._next = self._next, None
        data = pending.result()
        if not data:
            return None
        self.taken += len(data)
        if self.replayable and self.taken <= self.keep:
            self.kept.append(data)
        elif self.replayable:
            self.replayable = False
            self.kept.clear()
        return data

    async def _pull(self) -> bytes:
        while not self.ended:
            try:
                data = await anext(self._source)
            except StopAsyncIteration:
                self.ended = True
                return b""
            if data:
                self.received += len(data)
                if self.received > self.limit:
                    raise PayloadTooLarge(f"request body is larger than {self.limit} bytes")
                return data
        return b""

    def close(self) -> None:
        """Stop reading (the request is over, however it ended)."""
        pending, self._next = self._next, None
        if pending is not None and not pending.done():
            pending.cancel()
        elif pending is not None:
            with contextlib.suppress(BaseException):
                pending.result()  # retrieved: no "exception never retrieved" warning


def over_limit(declared: str | None, limit: int) -> int | None:
    """The declared length (None when there is none); 413 when it is over ``limit``."""
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    return int(declared)


async def read_fields(
    source: AsyncIterator[bytes], content_type: str, declared: str | None, limit: int,
    bound: int, names: tuple[str, ...] = ("model", "stream"),
) -> tuple[dict[str, str], Upload]:
    """The leading form fields ``names`` of a multipart upload, and the upload, of which
    only the pieces that held them have been read (:class:`FieldScanner`); its first
    ``bound`` bytes are kept for a retry. 400 for a body
    that is not multipart or is malformed as far as it was read, 413 for a declared length
    over ``limit``: all before anything is sent anywhere."""
    scanner = FieldScanner(boundary_of(content_type), names, bound)
    upload = Upload(source, limit, over_limit(declared, limit), keep=bound)
    while not scanner.feed(await upload.extend_head(), upload.ended):
        pass
    return scanner.fields, upload
