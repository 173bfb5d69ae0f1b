"""The OpenTelemetry side of :mod:`shared.tracing`: imported only when an OTLP endpoint is
set. Spans are batched and exported over OTLP/HTTP by the SDK's own thread."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.tracing import Attributes

logger = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()


class OtelTracing:
    def __init__(self, service: str, endpoint: str) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        # The SDK reads its other OTEL_* variables itself (headers, timeout, batch delay).
        url = endpoint.rstrip("/") + "/v1/traces"
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer = self.provider.get_tracer("svllm")
        logger.info("tracing: spans of %s go to %s", service, url)

    def span(self, name: str, traceparent: bytes | None,
             attributes: Attributes | None = None) -> OtelSpan:
        ctx = _PROPAGATOR.extract({"traceparent": traceparent.decode("latin-1")}) \
            if traceparent else None
        return OtelSpan(self, self.tracer.start_span(name, context=ctx, kind=SpanKind.SERVER,
                                                     attributes=attributes))

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is batched


class OtelSpan:
    __slots__ = ("_span", "tracing")

    def __init__(self, tracing: OtelTracing, span: Any) -> None:
        self.tracing = tracing
        self._span = span

    def traceparent(self) -> bytes:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(self._span))
        return carrier["traceparent"].encode("latin-1")

    def child(self, name: str, attributes: Attributes | None = None,
              start_ns: int | None = None) -> OtelSpan:
        span = self.tracing.tracer.start_span(name, context=set_span_in_context(self._span),
                                              kind=SpanKind.CLIENT, attributes=attributes,
                                              start_time=start_ns)
        return OtelSpan(self.tracing, span)

    def set(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def end(self, error: str = "", end_ns: int | None = None) -> None:
        if error:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end(end_time=end_ns)
