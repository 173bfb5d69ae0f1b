"""Manager entrypoint: settings from the environment, the scheduler loop, the HTTP API."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.manager.api import build_routes
from services.manager.scheduler import Scheduler
from shared.events import Nudger
from shared.http import serve
from shared.logs import setup_logging
from shared.service import background, make_app, open_store
from shared.settings import ManagerSettings

logger = logging.getLogger(__name__)


def create_app(settings: ManagerSettings) -> FastAPI:
    store = open_store(settings)
    nudger = Nudger(store)
    scheduler = Scheduler(store, settings, nudger)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logger.info("manager %s started", settings.manager_id)
        async with background(nudger.run(), scheduler.run()):
            yield
        # Hand the lease over at once instead of making the standby wait out the TTL.
        with contextlib.suppress(Exception):
            await scheduler.release()
        await store.close()

    app = make_app("svllm manager", lifespan)
    app.include_router(build_routes(store, settings, scheduler))
    return app


def main() -> None:
    settings = ManagerSettings()
    setup_logging("manager", settings.log_level, settings.log_format)
    serve(create_app(settings), settings.manager_host, settings.manager_port)


if __name__ == "__main__":
    main()
