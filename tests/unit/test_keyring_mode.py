"""AUTH_MODE=auto never opens /v1 by default: closed until the keys are loaded, and still
closed after a Redis that lost its data says no tenant has keys (real redis-server)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from services.router.keyring import KeyRing
from shared.apikeys import KeyRecord, hash_secret
from shared.errors import Unauthorized
from shared.events import Nudger
from shared.keys import Keys
from shared.settings import RouterSettings
from shared.store import Store
from tests.support import RedisServer


def ring_of(url: str, prefix: Keys, api_token: str | None = None) -> KeyRing:
    store = Store(aioredis.Redis.from_url(url, decode_responses=True), prefix)
    return KeyRing(store, Nudger(store), RouterSettings(router_id="r1", api_token=api_token))


def test_auto_is_closed_until_loaded_and_stays_keyed(redis_server: RedisServer) -> None:
    async def go() -> None:
        prefix = Keys(f"k{uuid.uuid4().hex[:8]}")
        ring = ring_of(redis_server.url, prefix)
        # Not loaded (a router whose Redis is away at its start): closed, not open.
        assert ring.mode == "keys"
        with pytest.raises(Unauthorized):
            ring.check(None)
        await ring.first_load(5.0)
        assert ring.mode == "open" and ring.check(None) is None  # no key anywhere: open
        await ring.store.save_key(KeyRecord(key_id="key_1", name="a", tenant="acme",
                                            secret_hash=hash_secret(b"s"), models=["*"]))
        await ring.reload()
        assert ring.mode == "keys"
        # Redis loses its data (restarted without persistence): the ring stays closed.
        # (Only this test's keys: the redis-server is shared.)
        async for key in ring.store.r.scan_iter(f"{prefix.prefix}:*"):
            await ring.store.r.delete(key)
        await ring.reload()
        assert ring.mode == "keys" and not ring.by_hash
        with pytest.raises(Unauthorized):
            ring.check(None)
        await ring.store.close()

    asyncio.run(go())


def test_a_router_without_redis_at_its_start_takes_only_api_token() -> None:
    async def go() -> None:
        ring = ring_of("redis://127.0.0.1:9", Keys("x"), api_token="tok")
        await ring.first_load(0.5)  # nothing listens on port 9
        assert not ring.loaded and ring.mode == "keys"
        assert ring.check(b"Bearer tok") is None  # the trusted token still works
        with pytest.raises(Unauthorized):
            ring.check(None)
        with pytest.raises(Unauthorized):
            ring.check(b"Bearer sk-svllm-unknown")
        await ring.store.close()

    asyncio.run(go())
