"""Who a request is from, as the router's request path sees it: the seam between
authentication (API keys) and what uses the answer (limits, fair queueing, usage, logs)."""

from __future__ import annotations

from dataclasses import dataclass

PRIORITIES = ("high", "normal", "low")


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str  # "" for a request admitted without a per-user key (API_TOKEN or open)
    name: str  # the key's name: a bounded label for logs and metrics
    tenant: str
    priority: str = "normal"  # one of PRIORITIES


# A request admitted by the shared API_TOKEN, or by an open endpoint.
ANONYMOUS = Principal("", "anonymous", "default", "normal")
