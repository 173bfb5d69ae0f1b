"""What every service's wiring shares: its store, its app shell, its background loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

from shared.errors import install_error_handlers
from shared.keys import Keys
from shared.settings import CommonSettings
from shared.store import Store, connect

Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def open_store(settings: CommonSettings) -> Store:
    client = connect(settings.redis_url, settings.redis_sentinels, settings.redis_sentinel_master)
    return Store(client, Keys(settings.redis_prefix), events=settings.events_enabled)


def make_app(title: str, lifespan: Lifespan) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    return app


@contextlib.asynccontextmanager
async def background(*loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``loops`` as tasks for the duration of the block; cancel and await them after."""
    tasks = [asyncio.create_task(c) for c in loops]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
