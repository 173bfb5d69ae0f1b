"""Prometheus metrics: one registry per service process, built in its ``main`` and passed in;
``/metrics`` serves it in the text format (docs/observability.md).

Nothing here is a global registry: each service's metric objects live on a class made once
at start-up, so tests build their own and nothing deep in the code reaches for a default.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Sequence

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from starlette.responses import Response

from shared.http import bearer_guard
from shared.settings import CommonSettings

# Request and answer durations: from a millisecond (a warm short answer) to ten minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The gaps between streamed chunks, and the router's own time per request: sub-millisecond.
FINE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5)
# Engine starts, wakes and holds: seconds to tens of minutes.
SLOW_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0,
                1800.0)


def status_class(status: int) -> str:
    """A bounded label for an HTTP status: "2xx" ... "5xx"; 499 (client gone) kept apart."""
    return "499" if status == 499 else f"{status // 100}xx"


class FuncCollector:
    """Families computed at scrape time (gauges of state the service already keeps), so
    nothing on any other path has to keep a metric up to date."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def render(families: Iterable[Metric]) -> Response:
    """Metric families (gathered elsewhere, e.g. the engines') in the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FuncCollector(lambda: families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metrics_guard(settings: CommonSettings) -> Callable[[Request], Awaitable[None]]:
    """METRICS_TOKEN or ADMIN_TOKEN as a bearer token, when either is set; else
    INTERNAL_TOKEN when that is (a manager often has no admin token: its metrics must not
    be the one thing it leaves open); with no token at all, open."""
    if settings.metrics_token or settings.admin_token:
        return bearer_guard(settings.metrics_token, settings.admin_token)
    return bearer_guard(settings.internal_token)


def metrics_routes(registry: CollectorRegistry, settings: CommonSettings) -> APIRouter:
    """``GET /metrics``: the registry in the Prometheus text format, behind
    :func:`metrics_guard`."""
    api = APIRouter()

    @api.get("/metrics", dependencies=[Depends(metrics_guard(settings))])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return api


class FastCounter:
    """A counter family for the request path: a dict of floats updated without a lock (one
    event loop updates it and serves the scrape, so nothing races), exported at scrape time.
    prometheus-client's own take a lock and look labels up per update: several times the
    cost, which a per-request hook pays several times over (docs/performance.md)."""

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def collect(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, v in list(self.values.items()):
            fam.add_metric(list(key), v)
        return fam


class FastHistogram:
    """A histogram family for the request path, as :class:`FastCounter`: per label set, the
    count in each bucket (not cumulative until scraped) and the sum."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.bounds = list(buckets)
        # key -> [count per bucket..., count above the last bound, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0.0] * (len(self.bounds) + 2)
        s[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        s[-1] += value

    def collect(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, s in list(self.series.items()):
            total, buckets = 0.0, []
            for bound, n in zip([*self.bounds, math.inf], s[:-1], strict=True):
                total += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), total))
            fam.add_metric(list(key), buckets, s[-1])
        return fam
