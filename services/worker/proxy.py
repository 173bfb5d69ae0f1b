"""Forwarding /proxy/{alias}/{path} to the local engine, for the engine paths clients need."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from services.worker.supervisor import Supervisor
from shared.errors import NoCapacity, NotFound
from shared.forwarding import UpstreamClient, relay
from shared.http import ClientGone, cancel_on_disconnect, read_body

# The engine's other endpoints (/sleep, /wake_up, /collective_rpc ...) are not for clients:
# vLLM leaves them unauthenticated, so only these pass.
ALLOWED: dict[str, str] = {
    "v1/chat/completions": "POST",
    "v1/completions": "POST",
    "v1/embeddings": "POST",
    "v1/models": "GET",
}
_FORWARD_HEADERS = ("content-type", "accept", "x-request-id")


async def forward(
    request: Request, alias: str, path: str, supervisor: Supervisor,
    client: UpstreamClient, limit: int,
) -> Response:
    method = ALLOWED.get(path)
    if method is None or method != request.method:
        raise NotFound(f"path '/{path}' is not proxied")
    engine = supervisor.serving(alias)
    if engine is None:
        inst = supervisor.instances.get(alias)
        state = inst.state.value if inst else "not assigned here"
        raise NoCapacity(f"model '{alias}' is not serving on this worker ({state})",
                         code="replica_not_ready")
    body = await read_body(request, limit) if method == "POST" else b""
    headers = {h: v for h in _FORWARD_HEADERS if (v := request.headers.get(h))}
    # In flight from here until the response is over: the idle clock must not run meanwhile.
    supervisor.begin(alias)
    try:
        # A non-streamed answer comes whole after the generation: if the router hangs up
        # meanwhile, closing the engine connection is what aborts the generation.
        upstream = await cancel_on_disconnect(
            request, client.open(method, f"{engine.base_url}/{path}", body, headers))
    except ClientGone:
        supervisor.end(alias)
        return Response(status_code=499)
    except BaseException:
        supervisor.end(alias)
        raise
    return relay(upstream, on_close=lambda: supervisor.end(alias))
