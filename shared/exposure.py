"""Secure by default: a service reachable from the network does not start without its tokens.

Checked once in each service's ``main``, before it binds: a non-loopback address with a token
unset refuses to start with a message that says how to fix it, unless ``ALLOW_INSECURE=true``
(then one loud warning, and the service's status says ``"insecure": true``). docs/security.md
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class Exposure:
    service: str
    host: str
    port: int
    # Environment names of the tokens this service needs and lacks.
    missing: tuple[str, ...]
    allow_insecure: bool

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)

    @property
    def insecure(self) -> bool:
        """Reachable from the network with something unguarded."""
        return self.exposed and bool(self.missing)

    def view(self) -> dict[str, Any]:
        return {"insecure": self.insecure, "bind": self.host,
                "missing_tokens": list(self.missing)}


def exposure(service: str, host: str, port: int, tokens: dict[str, str | None],
             allow_insecure: bool) -> Exposure:
    """``tokens``: environment name -> value, for the tokens ``service`` needs."""
    missing = tuple(name for name, value in tokens.items() if not value)
    return Exposure(service, host, port, missing, allow_insecure)


def refusal(e: Exposure) -> str:
    names = ", ".join(e.missing)
    return (
        f"refusing to start: the {e.service} binds {e.host}:{e.port}, which is not loopback, "
        f"and {names} {'is' if len(e.missing) == 1 else 'are'} not set, so anyone who can "
        "reach this port could use what the token guards (docs/security.md). Fix: set "
        f"{names} (each e.g. `openssl rand -hex 32`, the same value on every service; "
        "scripts/start_all.sh generates them), or bind loopback "
        f"({e.service.upper()}_HOST=127.0.0.1), or set ALLOW_INSECURE=true to run open on "
        "purpose.")


def enforce(e: Exposure) -> None:
    """Exit with :func:`refusal` when ``e`` is insecure and not allowed; warn when allowed."""
    if not e.insecure:
        return
    if not e.allow_insecure:
        logger.error("%s", refusal(e))
        raise SystemExit(refusal(e))
    logger.warning("INSECURE (ALLOW_INSECURE=true): the %s on %s:%d runs without %s; anyone "
                   "who can reach it can use what they guard. docs/security.md",
                   e.service, e.host, e.port, ", ".join(e.missing))
