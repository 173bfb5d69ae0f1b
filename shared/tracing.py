"""W3C trace context and OpenTelemetry spans (docs/observability.md).

A request's ``traceparent`` always passes on, router -> worker -> engine, untouched when no
tracing is configured. With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, router and worker also emit
spans through the OTLP/HTTP exporter (batched, off the request path): the router's handling
of a request, its hold while a model starts, each upstream attempt; the worker's proxying.
Each hop then sends on the traceparent of its own span, so the engine's spans (vLLM's
``--otlp-traces-endpoint``) hang under it.

Unset, :func:`make_tracing` returns None and nothing of OpenTelemetry is imported: the
request path pays one ``is None`` test.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

# Span attributes: bounded values only (model, worker, status; never prompts).
Attributes = dict[str, str | int]

# version-traceid-parentid-flags (W3C Trace Context); anything else is not passed on.
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def valid_traceparent(value: bytes | None) -> bytes | None:
    return value if value is not None and _TRACEPARENT.fullmatch(value) else None


def make_tracing(service: str, endpoint: str | None) -> Tracing | None:
    """Spans for ``service`` sent to the OTLP/HTTP ``endpoint`` (OTEL_EXPORTER_OTLP_ENDPOINT);
    None, with nothing of OpenTelemetry imported, when it is unset."""
    if not endpoint:
        return None
    from shared.otel import OtelTracing  # noqa: PLC0415 - the SDK loads only when tracing is on
    return OtelTracing(service, endpoint)


class Span(Protocol):
    """A started span: its traceparent for the next hop, children, attributes, its end."""

    def traceparent(self) -> bytes: ...

    def child(self, name: str, attributes: Attributes | None = None,
              start_ns: int | None = None) -> Span: ...

    def set(self, key: str, value: Any) -> None: ...

    def end(self, error: str = "", end_ns: int | None = None) -> None: ...


class Tracing(Protocol):
    def span(self, name: str, traceparent: bytes | None,
             attributes: Attributes | None = None) -> Span:
        """A started span, child of ``traceparent`` (or the root of a new trace)."""
        ...

    def shutdown(self) -> None: ...


def now_ns() -> int:
    return time.time_ns()


