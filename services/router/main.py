"""Router entrypoint: the OpenAI API and admin REST in front of the pool."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.responses import Response

from services.router import admin_api, console_api, openai_api
from services.router.breaker import Breaker
from services.router.forward import Forwarder
from services.router.hold import Holder
from services.router.routes import RouteTable
from services.router.upstream import Upstreams
from shared.events import Nudger
from shared.http import json_response, serve
from shared.logs import setup_logging
from shared.service import background, make_app, open_store
from shared.settings import RouterSettings
from shared.wire import Pool

logger = logging.getLogger(__name__)


def create_app(settings: RouterSettings) -> FastAPI:
    store = open_store(settings)
    nudger = Nudger(store)
    table = RouteTable(store, nudger, settings.route_refresh_s)
    client = Pool(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s)
    holder = Holder(table, store, settings)
    breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
    upstreams = Upstreams(table, client, settings.internal_token, settings.max_attempts,
                          settings.retry_backoff_s, breaker, settings.no_replica_retry_after_s)
    forwarder = Forwarder(table, upstreams, holder)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.default_engine == "sim":
            logger.warning("DEFAULT_ENGINE=sim: models registered without an engine use the "
                           "simulated engine, not vLLM")
        async with background(nudger.run(), table.run()):
            yield
        await client.close()
        await store.close()

    app = make_app("svllm router", lifespan)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "models": len(table.models),
                              "serving": sum(1 for r in table.routes.values() if r)})

    app.include_router(openai_api.build_routes(table, forwarder, settings.max_body_bytes))
    app.include_router(admin_api.build_routes(store, settings, table, breaker))
    console_api.install(app, store, settings, table)
    app.state.fast_lane = openai_api.fast_lane(table, upstreams, settings.max_body_bytes)
    return app


def main() -> None:
    settings = RouterSettings()
    setup_logging("router", settings.log_level, settings.log_format)
    app = create_app(settings)
    serve(app, settings.router_host, settings.router_port,
          app.state.fast_lane if settings.fast_lane else None)


if __name__ == "__main__":
    main()
