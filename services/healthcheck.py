"""A container health check: GET /health of the service running next to it; exit 0 or 1.

    python3 -m services.healthcheck [router|manager|worker]

Without an argument the service is the container's main process (``/proc/1/cmdline``, e.g.
``python3 -m services.worker.main``), so one image's HEALTHCHECK serves all three services.
The port is the service's ``{ROUTER,MANAGER,WORKER}_PORT`` with the settings' defaults.

Standard library only, on purpose: Docker runs this every interval in every container, and
importing pydantic and the settings would cost more CPU than the check itself.
tests/unit/test_deploy_docker.py keeps the names and defaults equal to shared/settings.py.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PORTS: dict[str, int] = {"router": 8000, "manager": 9000, "worker": 7000}
WILDCARDS = ("", "0.0.0.0", "::")
TIMEOUT_S = 3.0


def main_service(cmdline: Path = Path("/proc/1/cmdline")) -> str:
    """The service the container runs (its PID 1's ``services.<name>.main``); router if none."""
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return "router"
    for arg in argv:
        for name in DEFAULT_PORTS:
            if arg.decode(errors="replace") == f"services.{name}.main":
                return name
    return "router"


def health_url(service: str, env: Mapping[str, str]) -> str:
    prefix = service.upper()
    port = int(env.get(f"{prefix}_PORT") or DEFAULT_PORTS[service])
    host = env.get(f"{prefix}_HOST", "")
    # A service bound to every address answers on loopback; one bound to a single address
    # answers there only.
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def check(url: str) -> str | None:
    """None when ``url`` answers 200; otherwise why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return None if resp.status == 200 else f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{url}: {e}"


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else main_service()
    if service not in DEFAULT_PORTS:
        print(f"unknown service '{service}': router, manager or worker", file=sys.stderr)
        return 1  # Docker reserves 2
    problem = check(health_url(service, os.environ))
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
