"""``/metrics`` of a router served by several processes: the sum over all of them.

Prometheus scrapes one port, and the kernel hands the scrape to any one process. Each child
therefore also answers on a Unix socket in the supervisor's private directory (mode 0700)
with its own registry in the text format; the child that takes the scrape reads its siblings'
and adds up every sample with the same name and labels. Every router family is a counter, a
histogram or the held-requests gauge, and each is a sum over processes, so the total is what
one router with all those requests would report. A sibling that does not answer within
``_SIBLING_TIMEOUT_S`` (restarting) is left out of that scrape, and
``svllm_router_processes_scraped`` says how many were summed; a restarted child starts its
counters at zero, which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response

from shared.metrics import metrics_guard, render
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

_SIBLING_TIMEOUT_S = 2.0


def socket_path(sibling_dir: Path, index: int) -> Path:
    return sibling_dir / f"{index}.sock"


@contextlib.asynccontextmanager
async def exporting(registry: CollectorRegistry, sibling_dir: Path, index: int
                    ) -> AsyncIterator[None]:
    """Answer every connection on this process's socket with the registry's text, for the
    duration of the block."""
    path = socket_path(sibling_dir, index)
    path.unlink(missing_ok=True)  # a crashed predecessor's

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(generate_latest(registry))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(answer, path=str(path))
    try:
        yield
    finally:
        server.close()
        path.unlink(missing_ok=True)


async def _read(path: Path) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)),
                                                _SIBLING_TIMEOUT_S)
        try:
            data = await asyncio.wait_for(reader.read(), _SIBLING_TIMEOUT_S)
        finally:
            writer.close()
        return data.decode()
    except (OSError, TimeoutError) as e:
        logger.debug("router sibling %s did not answer: %s", path, e)
        return None


def merge(texts: Iterable[str]) -> list[Metric]:
    """Families summed sample by sample over ``texts`` (the Prometheus text format); labels
    keep the order they first came in."""
    families: dict[str, Metric] = {}
    # family -> (sample name, labels sorted) -> [labels as first seen, running sum]
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            into = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                seen = into.get(key)
                if seen is None:
                    into[key] = [s.labels, s.value]
                else:
                    seen[1] += s.value
    out = []
    for name, fam in families.items():
        for (sample, _), (labels, v) in values[name].items():
            fam.add_sample(sample, labels, v)
        out.append(fam)
    return out


def metrics_routes(registry: CollectorRegistry, settings: CommonSettings, sibling_dir: Path,
                   index: int, count: int) -> APIRouter:
    """``GET /metrics`` as :func:`shared.metrics.metrics_routes`, summed over the siblings."""
    api = APIRouter()
    others = [socket_path(sibling_dir, i) for i in range(count) if i != index]

    @api.get("/metrics", dependencies=[Depends(metrics_guard(settings))])
    async def metrics() -> Response:
        own = generate_latest(registry).decode()
        read = await asyncio.gather(*[_read(p) for p in others])
        texts = [own, *[t for t in read if t is not None]]
        scraped = GaugeMetricFamily("svllm_router_processes_scraped",
                                    "Router processes whose metrics this scrape sums.",
                                    value=len(texts))
        return render([*merge(texts), scraped])

    return api
