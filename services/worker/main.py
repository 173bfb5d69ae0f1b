"""Worker entrypoint: GPU inventory, engines, the agent's loops, the HTTP API."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import Response

from services.worker import proxy
from services.worker.agent import Agent
from services.worker.api import build_routes
from services.worker.engines import available_drivers
from services.worker.engines.environment import parse_passthrough
from services.worker.gpu import open_inventory
from services.worker.lora import LoraManager
from services.worker.metrics import WorkerMetrics, engine_metrics
from services.worker.prefetch import Prefetcher, Weights
from services.worker.supervisor import Supervisor
from services.worker.weights import hub_cache_dir
from shared.engine_policy import Sandbox
from shared.events import Nudger
from shared.exposure import Exposure, enforce, exposure
from shared.http import make_client
from shared.logs import setup_logging
from shared.metrics import metrics_guard, metrics_routes, render
from shared.models import InstanceState
from shared.service import background, make_app, open_store, pin_mmap_threshold, run
from shared.settings import WorkerSettings
from shared.tracing import make_tracing
from shared.wire import Pool

logger = logging.getLogger(__name__)


def worker_exposure(settings: WorkerSettings) -> Exposure:
    return exposure("worker", settings.worker_host, settings.worker_port,
                    {"ADMIN_TOKEN": settings.admin_token,
                     "INTERNAL_TOKEN": settings.internal_token}, settings.allow_insecure)


def create_app(settings: WorkerSettings,
               in_process_timeouts: tuple[float, float] | None = None) -> FastAPI:
    """``in_process_timeouts`` (connect, read): also a proxy for a router in this process
    (services.node) as ``app.state.in_process``, its own engine connections timed out as
    that router's are."""
    store = open_store(settings)
    client = make_client(5.0, 3600.0)  # control calls to engines: health, sleep, metrics
    upstream = Pool(5.0, 3600.0)  # the request hot path
    drivers = available_drivers(
        settings.worker_engines, settings.vllm_command,
        # Not "<alias>.log": no alias starts with "_", so no engine log is ever this file.
        probe_log=settings.state_dir / settings.worker_id / "_vllm-flags.log",
        env_passthrough=parse_passthrough(settings.engine_env_passthrough))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, settings.worker_id) if settings.metrics else None
    local = Pool(*in_process_timeouts) if in_process_timeouts else None
    heard_from = upstream.heard_from
    if local is not None:
        # An engine answering requests is alive, whichever pool carried them.
        def heard_from(base_url: str) -> float:
            return max(upstream.heard_from(base_url), local.heard_from(base_url))

    supervisor = Supervisor(store, settings, drivers, client, metrics, heard_from)
    nudger = Nudger(store)
    inventory = open_inventory(settings.gpu_backend, settings.fake_gpus, supervisor.engine_uses)
    sandbox = Sandbox.from_settings(settings.allow_trust_remote_code, settings.model_roots)
    weights_view = Weights(hub_cache_dir(settings.hf_hub_cache, settings.hf_home),
                           sandbox.model_roots)
    prefetcher = Prefetcher(store, settings.worker_id, weights_view,
                            settings.prefetch_source_dir, settings.reconcile_interval_s)
    agent = Agent(store, settings, supervisor, inventory, nudger, client, weights_view)
    tracing = make_tracing("svllm-worker", settings.otel_exporter_otlp_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if "vllm" not in drivers:
            logger.warning("vLLM is not available on this worker; it runs engines: %s",
                           ", ".join(sorted(drivers)))
        await agent.recover()
        async with background(nudger.run(), agent.heartbeat_loop(), agent.reconcile_loop(),
                              supervisor.health_loop(), agent.weights_loop(), prefetcher.run()):
            yield
        await supervisor.stop_all()
        with contextlib.suppress(Exception):
            await store.unregister_worker_alive(settings.worker_id)
        await client.aclose()
        await upstream.close()
        if local is not None:
            await local.close()
        await store.close()
        if tracing is not None:
            tracing.shutdown()

    app = make_app("svllm worker", lifespan)
    loras = LoraManager(store, settings.worker_id, client, sandbox)
    app.include_router(build_routes(store, settings, agent, upstream,
                                    worker_exposure(settings).insecure, loras, tracing))
    if metrics is not None:
        install_metrics(app, metrics, settings, supervisor, agent, client)
    app.state.fast_lane = proxy.picker(proxy.fast_handler(
        supervisor, upstream, settings.internal_token, settings.max_body_bytes, tracing))
    if local is not None:
        app.state.in_process = proxy.InProcess(settings.worker_id, supervisor, local, tracing)
    return app


def install_metrics(app: FastAPI, metrics: WorkerMetrics, settings: WorkerSettings,
                    supervisor: Supervisor, agent: Agent, client: httpx.AsyncClient) -> None:
    """``/metrics`` (the worker's own) and ``/metrics/engines`` (its serving engines',
    labelled with model and worker), both behind METRICS_TOKEN / ADMIN_TOKEN."""
    metrics.instance_gauges(lambda: {a: i.state for a, i in supervisor.instances.items()})
    metrics.gpu_gauges(lambda: agent.read_gpus()[0], supervisor.reserved_by_gpu)
    app.include_router(metrics_routes(metrics.registry, settings))

    @app.get("/metrics/engines", dependencies=[Depends(metrics_guard(settings))])
    async def engines() -> Response:
        serving = {a: i.engine for a, i in supervisor.instances.items()
                   if i.engine is not None and i.state is InstanceState.RUNNING}
        return render(await engine_metrics(client, serving, settings.worker_id))


def main() -> None:
    settings = WorkerSettings()
    setup_logging(f"worker {settings.worker_id}", settings.log_level, settings.log_format)
    pin_mmap_threshold()  # large relayed reads go back to the system once sent
    enforce(worker_exposure(settings))
    app = create_app(settings)
    run(app, settings, settings.worker_host, settings.worker_port, app.state.fast_lane)


if __name__ == "__main__":
    main()
