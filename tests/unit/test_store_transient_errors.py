"""A pipelined read whose reply is an error about Redis's health or rights (here NOPERM;
LOADING, BUSY or a cluster's TRYAGAIN alike) fails the read: read as empty, it would drop
live records (every API key of a tenant) until their next change. A key of the wrong type
is still skipped and reported (tests/integration/test_store_poison.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from shared.apikeys import KeyRecord, hash_secret
from shared.keys import Keys
from shared.store import Store
from tests.support import RedisServer


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[Store, Store]]:
    """A store with every right, and one of a user refused HGETALL, on the same pool."""
    keys = Keys(f"u{uuid.uuid4().hex[:8]}")
    user = f"no-hgetall-{keys.prefix}"
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-hgetall"])
    full = Store(aioredis.Redis.from_url(redis_server.url, decode_responses=True), keys)
    host, port = redis_server.url.removeprefix("redis://").split("/")[0].split(":")
    limited = Store(aioredis.Redis(host=host, port=int(port), username=user, password="pw",
                                   decode_responses=True), keys)
    try:
        yield full, limited
    finally:
        admin.acl_deluser(user)
        admin.close()
        await full.r.aclose()
        await limited.r.aclose()


def _key(key_id: str, tenant: str) -> KeyRecord:
    return KeyRecord(key_id=key_id, name="app", tenant=tenant,
                     secret_hash=hash_secret(key_id.encode()), models=["*"])


async def test_a_refused_read_of_the_keys_fails_instead_of_reading_none(
        stores: tuple[Store, Store]) -> None:
    full, limited = stores
    await full.save_key(_key("key_a", "acme"))
    await full.save_key(_key("key_g", "globex"))
    keys, _, tenants = await full.all_keys()
    assert sorted(k.key_id for k in keys) == ["key_a", "key_g"] and tenants == 2
    # Before: ([], {}, 2), and a router's ring held no key until the next key change.
    with pytest.raises(NoPermissionError):
        await limited.all_keys()
    assert await limited.keys_version() == await full.keys_version()  # other reads work
