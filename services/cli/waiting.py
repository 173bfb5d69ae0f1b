"""``--wait``: follow a model's state until a replica serves, showing each step."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from services.cli.client import Client, CliError

POLL_S = 0.3


def _describe(m: dict[str, Any]) -> str:
    inst = ", ".join(f"{i['worker_id']}: {i.get('state', '?')}" for i in m.get("instances", []))
    return f"{m['alias']}: {m['state']}" + (f" ({inst})" if inst else "")


def wait_serving(c: Client, out: Console, alias: str, timeout_s: float, *,
                 wake_cold: bool) -> None:
    """Until an instance of ``alias`` is RUNNING; a FAILED one or the deadline is an error.

    A scale-to-zero model stays COLD until a request comes: unless this follows a wake, that
    is the end of the wait, said plainly rather than waited out."""
    start = time.monotonic()
    last = ""
    with out.status(f"waiting for {alias}") as spinner:
        while True:
            m = c.model(alias)
            step = _describe(m)
            if step != last:
                out.print(f"  {time.monotonic() - start:6.1f}s  {step}")
                spinner.update(step)
                last = step
            running = [i for i in m["instances"] if i.get("state") == "RUNNING"]
            if running:
                out.print(f"{alias} serving on {', '.join(i['worker_id'] for i in running)} "
                          f"after {time.monotonic() - start:.1f}s")
                return
            failed = [i for i in m["instances"] if i.get("state") == "FAILED"]
            if failed:
                raise CliError(f"{alias} failed on {failed[0]['worker_id']}: "
                               f"{failed[0].get('error') or 'see svllm logs ' + alias}")
            if m["state"] == "COLD" and not wake_cold:
                out.print(f"{alias} is COLD (min_replicas 0): it starts on the first request "
                          f"or on `svllm models wake {alias} --wait`")
                return
            if time.monotonic() - start > timeout_s:
                raise CliError(f"{alias} not serving after {timeout_s:.0f}s ({step})")
            time.sleep(POLL_S)
