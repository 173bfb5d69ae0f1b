"""What every service's wiring shares: its store, its app shell, its background loops."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

from shared.edge import Limits, raise_open_files
from shared.errors import install_error_handlers
from shared.fastlane import Picker
from shared.http import make_server, serve, serve_together
from shared.keys import Keys
from shared.settings import CommonSettings
from shared.store import Store, connect

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def open_store(settings: CommonSettings) -> Store:
    client = connect(settings.redis_url, settings.redis_sentinels, settings.redis_sentinel_master,
                     settings.redis_cluster_nodes)
    return Store(client, Keys(settings.redis_prefix), events=settings.events_enabled)


def make_app(title: str, lifespan: Lifespan) -> FastAPI:
    # No /openapi.json or docs pages: they map every endpoint for whoever asks. No redirect
    # for a trailing slash either: Starlette builds it from the client's Host header.
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, lifespan=lifespan)
    install_error_handlers(app)
    return app


def run(app: FastAPI, settings: CommonSettings, host: str, port: int,
        fast: Picker | None = None, sock: socket.socket | None = None) -> None:
    """Serve ``app`` behind the edge limits of ``settings`` (shared/edge.py), with the
    open-file limit raised first so that the connection cap, not the kernel, says no."""
    limits = Limits.of(settings, raise_open_files())
    logger.info("edge limits: %s", limits)
    tune_gc(settings.gc_gen0_threshold)
    serve(app, host, port, limits, fast if settings.fast_lane else None, sock)


def run_together(parts: list[tuple[FastAPI, CommonSettings, str, int, Picker | None]]
                 ) -> None:
    """:func:`run` for several apps (app, its settings, host, port, fast lane) in one process
    and event loop (services.node)."""
    # The servers share the process's open files: each gets its share for its connections.
    open_files = raise_open_files() // len(parts)
    servers = []
    for app, settings, host, port, fast in parts:
        limits = Limits.of(settings, open_files)
        logger.info("edge limits of %s: %s", app.title, limits)
        servers.append(make_server(app, host, port, limits,
                                   fast if settings.fast_lane else None))
    tune_gc(parts[0][1].gc_gen0_threshold)
    serve_together(servers)


def tune_gc(gen0_threshold: int) -> None:
    """Freeze what start-up made (modules, settings, app) out of the cyclic collector, and
    collect the young generation every ``gen0_threshold`` allocations (0: Python's default)."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


@contextlib.asynccontextmanager
async def background(*loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``loops`` as tasks for the duration of the block; cancel and await them after."""
    tasks = [asyncio.create_task(c) for c in loops]
    try:
        yield
    finally:
        pending = set(tasks)
        while pending:
            for t in pending:
                t.cancel()
            # Python 3.11's wait_for can drop a cancellation that lands as its inner wait
            # completes (a hint arriving at shutdown), and the loop then goes on: a router
            # process once hung in its shutdown. The cancel is sent again until every task
            # has ended.
            _, pending = await asyncio.wait(pending, timeout=1.0)
        await asyncio.gather(*tasks, return_exceptions=True)


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap, returned to
    the system when freed. By default glibc raises this threshold to the largest block freed
    so far, after which socket-read-sized buffers (up to 256 KB: uvloop's read size) come
    from the heap, where they fragment it and stay resident: 20 slow readers of large answers
    then left the router ~20 MB above its baseline for good. Pinned, they leave nothing.
    False where the C library has no mallopt (the process then simply keeps the default)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, nbytes))
    if not ok:
        logger.info("mallopt(M_MMAP_THRESHOLD) is not supported here; allocator defaults kept")
    return ok
