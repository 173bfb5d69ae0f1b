"""CPU cost of one HTTP client library per proxied request (the hop router -> worker -> engine).

    python -m bench.clientload --lib httpx|aiohttp|wire --url URL --concurrency 16 --requests 4000

Run by bench.client_cost with the interpreter that has the library: httpx and wire (the
project's own shared/wire.py, what the services use) from the project's .venv, aiohttp from
.venv-bench. Imports the project only for ``--lib wire``, so either venv can run the others.
Prints one JSON line: req/s and this process's CPU microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable

BODY = b'{"model":"sim0","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
HEADERS = {"content-type": "application/json"}

Send = Callable[[], Awaitable[None]]


async def _httpx_sender(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx  # noqa: PLC0415 - only in the venv that has it

    # The same limits as shared.http.make_client, streamed like shared.http.open_upstream.
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))

    async def send() -> None:
        req = client.build_request("POST", url, content=BODY, headers=HEADERS)
        resp = await client.send(req, stream=True)
        async for _ in resp.aiter_raw():
            pass
        await resp.aclose()

    return send, client.aclose


async def _aiohttp_sender(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiohttp  # noqa: PLC0415 - only in the venv that has it

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))

    async def send() -> None:
        async with session.post(url, data=BODY, headers=HEADERS) as resp:
            async for _ in resp.content.iter_any():
                pass

    return send, session.close


async def _wire_sender(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from shared.wire import Pool  # noqa: PLC0415 - the project's venv only

    pool = Pool(5.0, 60.0)
    base, _, path = url.partition("/v1/")
    headers = b"".join(f"{k}: {v}\r\n".encode() for k, v in HEADERS.items())

    async def send() -> None:
        ex = await pool.send(base, b"POST", b"/v1/" + path.encode(), headers, BODY)
        await ex.read_all()

    return send, pool.close


_SENDERS = {"httpx": _httpx_sender, "aiohttp": _aiohttp_sender, "wire": _wire_sender}


async def measure(lib: str, url: str, concurrency: int, requests: int) -> dict[str, object]:
    make = _SENDERS[lib]
    send, close = await make(url)
    each = max(1, requests // concurrency)

    async def user() -> None:
        for _ in range(each):
            await send()

    await asyncio.gather(*(user() for _ in range(concurrency)))  # warm the pool
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    await close()
    done = each * concurrency
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"lib": lib, "concurrency": concurrency, "rps": done / wall,
            "cpu_us_per_request": used / done * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", choices=tuple(_SENDERS), required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - the services run on uvloop; use it where installed

        runner: Callable[..., dict[str, object]] = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(measure(args.lib, args.url, args.concurrency, args.requests))))


if __name__ == "__main__":
    main()
