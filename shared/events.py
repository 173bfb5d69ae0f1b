"""Turning pub/sub hints into a nudge for a reconcile loop, surviving Redis restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from shared.store import Store

logger = logging.getLogger(__name__)


class Nudger:
    """Sets ``event`` whenever a hint arrives; the loop it wakes still runs on a timer."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.event = asyncio.Event()
        self._kinds: dict[str, asyncio.Event] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def on_hint(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` with every hint, and with ``{"kind": "resubscribed"}`` after the
        subscription was lost (hints may have been missed: look at everything)."""
        self._listeners.append(listener)

    def watch(self, kind: str) -> asyncio.Event:
        """An event of its own set by hints of ``kind`` alone (and on resubscribe)."""
        return self._kinds.setdefault(kind, asyncio.Event())

    def _on_event(self, hint: dict[str, Any]) -> None:
        self.event.set()
        for listener in self._listeners:
            listener(hint)
        kind = self._kinds.get(str(hint.get("kind")))
        if kind is not None:
            kind.set()

    async def run(self) -> None:
        while True:
            try:
                await self.store.listen(self._on_event)
                return  # events disabled
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any Redis failure: resubscribe later
                logger.warning("event subscription lost (%s); retrying", e)
                # Anything could have changed while we were deaf: look again.
                self.event.set()
                for listener in self._listeners:
                    listener({"kind": "resubscribed"})
                for kind in self._kinds.values():
                    kind.set()
                await asyncio.sleep(1.0)

    async def wait(self, timeout_s: float) -> None:
        """Return after a hint or ``timeout_s``, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout_s)
        self.event.clear()
