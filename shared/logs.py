"""Logging set-up, called only from entrypoints. JSON lines by default.

Every line logged while a request is handled carries its id: the request path sets
:data:`REQUEST_ID` (a context variable, so each request's task has its own) and both
formatters add it. A line may carry structured ``fields`` (``extra={"fields": {...}}``): the
access log's; JSON lines get them as keys, text lines as ``key=value``.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar

import orjson

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def _request_id(record: logging.LogRecord) -> str | None:
    return getattr(record, "request_id", None) or REQUEST_ID.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = _request_id(record)
        if request_id:
            data["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        request_id = _request_id(record)
        if request_id and not (fields and "request_id" in fields):
            line += f" request_id={request_id}"
        return line


def setup_logging(service: str, level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        fmt_text = f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(TextFormatter(fmt_text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: far too loud on the hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)
