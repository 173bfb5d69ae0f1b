"""Manager entrypoint: settings from the environment, the scheduler loop, the HTTP API."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.manager.api import build_routes
from services.manager.metrics import ManagerMetrics
from services.manager.models_watch import ModelsFileWatcher
from services.manager.scheduler import Scheduler
from shared.engine_policy import Sandbox
from shared.events import Nudger
from shared.exposure import Exposure, enforce, exposure
from shared.logs import setup_logging
from shared.metrics import metrics_routes
from shared.service import background, make_app, open_store, run
from shared.settings import ManagerSettings

logger = logging.getLogger(__name__)


def manager_exposure(settings: ManagerSettings) -> Exposure:
    return exposure("manager", settings.manager_host, settings.manager_port,
                    {"INTERNAL_TOKEN": settings.internal_token}, settings.allow_insecure)


def create_app(settings: ManagerSettings) -> FastAPI:
    store = open_store(settings)
    nudger = Nudger(store)
    registry = CollectorRegistry()
    metrics = ManagerMetrics(registry) if settings.metrics else None
    scheduler = Scheduler(store, settings, nudger, metrics)
    if metrics is not None:
        metrics.leader_gauges(scheduler.state)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logger.info("manager %s started", settings.manager_id)
        loops = [nudger.run(), scheduler.run()]
        if settings.models_file is not None:
            loops.append(ModelsFileWatcher(
                settings.models_file, store, default_engine=settings.default_engine,
                prune=settings.models_file_prune, poll_s=settings.models_file_poll_s,
                is_leader=lambda: scheduler.state.leader,
                sandbox=Sandbox.from_settings(settings.allow_trust_remote_code,
                                              settings.model_roots)).run())
        async with background(*loops):
            yield
        # Hand the lease over at once instead of making the standby wait out the TTL.
        with contextlib.suppress(Exception):
            await scheduler.release()
        await store.close()

    app = make_app("svllm manager", lifespan)
    app.include_router(build_routes(store, settings, scheduler,
                                    manager_exposure(settings).insecure))
    if metrics is not None:
        app.include_router(metrics_routes(registry, settings))
    return app


def main() -> None:
    settings = ManagerSettings()
    setup_logging("manager", settings.log_level, settings.log_format)
    enforce(manager_exposure(settings))
    run(create_app(settings), settings, settings.manager_host, settings.manager_port)


if __name__ == "__main__":
    main()
