"""Router entrypoint: the OpenAI API and admin REST in front of the pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.responses import Response

from services.router import admin_api, openai_api
from services.router.forward import Forwarder
from services.router.routes import RouteTable
from shared.errors import install_error_handlers
from shared.events import Nudger
from shared.http import json_response, make_client, serve
from shared.keys import Keys
from shared.logs import setup_logging
from shared.settings import RouterSettings
from shared.store import Store, connect

logger = logging.getLogger(__name__)


def create_app(settings: RouterSettings) -> FastAPI:
    store = Store(connect(settings.redis_url), Keys(settings.redis_prefix),
                  events=settings.events_enabled)
    nudger = Nudger(store)
    table = RouteTable(store, nudger, settings.route_refresh_s)
    client = make_client(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s)
    forwarder = Forwarder(table, store, client, settings.internal_token,
                          settings.no_replica_retry_after_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.default_engine == "sim":
            logger.warning("DEFAULT_ENGINE=sim: models registered without an engine use the "
                           "simulated engine, not vLLM")
        tasks = [asyncio.create_task(nudger.run()), asyncio.create_task(table.run())]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            await store.close()

    app = FastAPI(title="svllm router", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "models": len(table.models),
                              "serving": sum(1 for r in table.routes.values() if r)})

    app.include_router(openai_api.build_routes(table, forwarder, settings.max_body_bytes))
    app.include_router(admin_api.build_routes(store, settings, table))
    return app


def main() -> None:
    settings = RouterSettings()
    setup_logging("router", settings.log_level, settings.log_format)
    serve(create_app(settings), settings.router_host, settings.router_port)


if __name__ == "__main__":
    main()
