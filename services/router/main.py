"""Router entrypoint: the OpenAI API and admin REST in front of the pool."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from services.router import (
    adapters_api,
    admin_api,
    console_api,
    keys_api,
    openai_api,
    processes,
    siblings,
    weights_api,
)
from services.router.adapters import AdapterTable
from services.router.admission import Gate
from services.router.breaker import Breaker
from services.router.forward import Forwarder
from services.router.hold import Holder
from services.router.keyring import KeyRing
from services.router.limiter import Limiter
from services.router.metrics import AccessLog, Recorder, RouterMetrics
from services.router.routes import RouteTable
from services.router.upstream import InProcessWorker, Upstreams
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
# How long a starting router waits for the API keys before it serves (closed without them).
_KEYS_FIRST_LOAD_S = 5.0


def router_exposure(settings: RouterSettings) -> Exposure:
    tokens = {"ADMIN_TOKEN": settings.admin_token, "INTERNAL_TOKEN": settings.internal_token}
    # With AUTH_MODE=keys, /v1 needs an API key whatever API_TOKEN is.
    if not settings.api_open and settings.auth_mode not in ("keys", "open"):
        tokens["API_TOKEN"] = settings.api_token
    return exposure("router", settings.router_host, settings.router_port, tokens,
                    settings.allow_insecure)


def create_app(settings: RouterSettings, child: processes.Child | None = None,
               in_process: InProcessWorker | None = None) -> FastAPI:
    """``in_process``: the worker sharing this process (services.node), whose replicas get
    their requests by a call instead of over HTTP."""
    store = open_store(settings)
    nudger = Nudger(store)
    table = RouteTable(store, nudger, settings.route_refresh_s)
    client = Pool(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s)
    holder = Holder(table, store, settings)
    adapters = AdapterTable(store, settings.route_refresh_s)
    breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_s)
    ring = KeyRing(store, nudger, settings)
    # Routers sharing each replica's max_inflight: fixed (each of a router's processes
    # counting as one), or those checking in lately (every process checks in on its own).
    routers = (lambda: settings.router_count * max(1, settings.router_processes)) if (
        settings.router_count) else (lambda: ring.routers)
    upstreams = Upstreams(table, client, settings.internal_token, settings.max_attempts,
                          settings.retry_backoff_s, breaker, settings.no_replica_retry_after_s,
                          settings.buffer_answer_max_bytes, settings.prefix_affinity_slack,
                          adapters,
                          admission=Gate(table, settings.queue_max, settings.queue_timeout_s,
                                         routers),
                          in_process=in_process)
    forwarder = Forwarder(table, upstreams, holder)
    limiter = Limiter(store, ring, settings)
    gate = openai_api.KeyGate(ring, limiter, settings.limits_default_max_tokens)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry) if settings.metrics else None
    if metrics is not None:
        metrics.held = holder
    access = AccessLog(settings.access_log, settings.access_log_sample, settings.log_format,
                       shared_stream=child is not None)
    tracing = make_tracing("svllm-router", settings.otel_exporter_otlp_endpoint)
    recorder = Recorder(metrics, access, tracing)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.default_engine == "sim":
            logger.warning("DEFAULT_ENGINE=sim: models registered without an engine use the "
                           "simulated engine, not vLLM")
        await ring.first_load(_KEYS_FIRST_LOAD_S)
        async with processes.running_as(child, registry if metrics else None), background(
                nudger.run(), table.run(), adapters.run(), ring.run(), limiter.run()):
            yield
        with contextlib.suppress(Exception):
            await limiter.flush_all()  # the last usage counts and corrections
        await client.close()
        await store.close()
        access.flush()
        if tracing is not None:
            tracing.shutdown()

    app = make_app("svllm router", lifespan)

    @app.get("/health")
    async def health() -> Response:
        # "process": which of the router's processes answered (null: it runs alone).
        body = {"status": "ok", "models": len(table.models),
                "serving": sum(1 for r in table.routes.values() if r),
                "process": child.index if child is not None else None}
        if in_process is not None:  # services.node: the worker it serves without a hop
            body["worker"] = in_process.worker_id
            body["in_process_requests"] = in_process.requests
        return json_response(body)

    # Shown in /admin/status: what this router leaves open, on purpose or not.
    security = router_exposure(settings).view()
    app.include_router(openai_api.build_routes(table, forwarder, settings.max_body_bytes,
                                               gate, recorder, settings.admin_token,
                                               settings.prefix_affinity_chars, adapters,
                                               settings.max_audio_bytes))
    if metrics is not None:
        app.include_router(metrics_routes(registry, settings) if child is None else
                           siblings.metrics_routes(registry, settings, child.sibling_dir,
                                                   child.index, child.count))
    app.include_router(admin_api.build_routes(store, settings, table, breaker, security,
                                              ring, upstreams.admission))
    app.include_router(keys_api.build_routes(store, settings, ring))
    app.include_router(adapters_api.build_routes(store, settings, adapters))
    app.include_router(weights_api.build_routes(store, settings))
    console_api.install(app, store, settings, table)
    app.state.fast_lane = openai_api.fast_lane(table, upstreams, settings.max_body_bytes, gate,
                                               recorder, settings.prefix_affinity_chars,
                                               adapters)
    return app


def main() -> None:
    settings = RouterSettings()
    setup_logging("router", settings.log_level, settings.log_format)
    pin_mmap_threshold()  # large relayed reads go back to the system once sent
    enforce(router_exposure(settings))
    child = processes.Child.from_env()
    settings.router_processes = child.count if child else processes.process_count(settings)
    if child is None and settings.router_processes > 1:
        raise SystemExit(processes.supervise(settings, settings.router_processes))
    app = create_app(settings, child)
    run(app, settings, settings.router_host, settings.router_port, app.state.fast_lane,
        sock=child.socket() if child is not None else None)


if __name__ == "__main__":
    main()
