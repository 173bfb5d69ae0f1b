"""Manager entrypoint: settings from the environment, the scheduler loop, the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.manager.api import build_routes
from services.manager.scheduler import Scheduler
from shared.errors import install_error_handlers
from shared.events import Nudger
from shared.http import serve
from shared.keys import Keys
from shared.logs import setup_logging
from shared.settings import ManagerSettings
from shared.store import Store, connect

logger = logging.getLogger(__name__)


def create_app(settings: ManagerSettings) -> FastAPI:
    store = Store(connect(settings.redis_url), Keys(settings.redis_prefix),
                  events=settings.events_enabled)
    nudger = Nudger(store)
    scheduler = Scheduler(store, settings, nudger)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(nudger.run()), asyncio.create_task(scheduler.run())]
        logger.info("manager %s started", settings.manager_id)
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Hand the lease over at once instead of making the standby wait out the TTL.
            with contextlib.suppress(Exception):
                await scheduler.release()
            await store.close()

    app = FastAPI(title="svllm manager", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(build_routes(store, settings, scheduler))
    return app


def main() -> None:
    settings = ManagerSettings()
    setup_logging("manager", settings.log_level, settings.log_format)
    serve(create_app(settings), settings.manager_host, settings.manager_port)


if __name__ == "__main__":
    main()
