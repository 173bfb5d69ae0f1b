"""Router entrypoint: the OpenAI API and admin REST in front of the pool."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from services.router import admin_api, console_api, openai_api
from services.router.breaker import Breaker
from services.router.forward import Forwarder
from services.router.hold import Holder
from services.router.metrics import AccessLog, Recorder, RouterMetrics
from services.router.routes import RouteTable
from services.router.upstream import Upstreams
from shared.events import Nudger
from shared.exposure import Exposure, enforce, exposure
from shared.http import json_response
from shared.logs import setup_logging
from shared.metrics import metrics_routes
from shared.service import background, make_app, open_store, pin_mmap_threshold, run
from shared.settings import RouterSettings
from shared.tracing import make_tracing
from shared.wire import Pool

logger = logging.getLogger(__name__)


def router_exposure(settings: RouterSettings) -> Exposure:
    tokens = {"ADMIN_TOKEN": settings.admin_token, "INTERNAL_TOKEN": settings.internal_token}
    if not settings.api_open:
        tokens["API_TOKEN"] = settings.api_token
    return exposure("router", settings.router_host, settings.router_port, tokens,
                    settings.allow_insecure)


def create_app(settings: RouterSettings) -> FastAPI:
    store = open_store(settings)
    nudger = Nudger(store)
    table = RouteTable(store, nudger, settings.route_refresh_s)
    client = Pool(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s)
    holder = Holder(table, store, settings)
    breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
    upstreams = Upstreams(table, client, settings.internal_token, settings.max_attempts,
                          settings.retry_backoff_s, breaker, settings.no_replica_retry_after_s,
                          settings.buffer_answer_max_bytes)
    forwarder = Forwarder(table, upstreams, holder)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry) if settings.metrics else None
    if metrics is not None:
        metrics.held = holder
    access = AccessLog(settings.access_log, settings.access_log_sample, settings.log_format)
    tracing = make_tracing("svllm-router", settings.otel_exporter_otlp_endpoint)
    recorder = Recorder(metrics, access, tracing)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.default_engine == "sim":
            logger.warning("DEFAULT_ENGINE=sim: models registered without an engine use the "
                           "simulated engine, not vLLM")
        async with background(nudger.run(), table.run()):
            yield
        await client.close()
        await store.close()
        access.flush()
        if tracing is not None:
            tracing.shutdown()

    app = make_app("svllm router", lifespan)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "models": len(table.models),
                              "serving": sum(1 for r in table.routes.values() if r)})

    # Shown in /admin/status: what this router leaves open, on purpose or not.
    security = router_exposure(settings).view() | {
        "openai_api": "token" if settings.api_token else "open"}
    app.include_router(openai_api.build_routes(table, forwarder, settings.max_body_bytes,
                                               settings.api_token, recorder,
                                               settings.admin_token))
    if metrics is not None:
        app.include_router(metrics_routes(registry, settings))
    app.include_router(admin_api.build_routes(store, settings, table, breaker, security))
    console_api.install(app, store, settings, table)
    app.state.fast_lane = openai_api.fast_lane(table, upstreams, settings.max_body_bytes,
                                               settings.api_token, recorder)
    return app


def main() -> None:
    settings = RouterSettings()
    setup_logging("router", settings.log_level, settings.log_format)
    pin_mmap_threshold()  # large relayed reads go back to the system once sent
    enforce(router_exposure(settings))
    app = create_app(settings)
    run(app, settings, settings.router_host, settings.router_port, app.state.fast_lane)


if __name__ == "__main__":
    main()
