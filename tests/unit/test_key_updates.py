"""A key's edits and rotations against a real redis-server: each is read, changed and written
in one optimistic transaction, so two at once both hold (an edit that read the key before a
rotation never writes the old secret back), and a revoked key is not brought back."""

from __future__ import annotations

import uuid

import pytest
import redis
import redis.asyncio as aioredis

from shared.apikeys import KeyRecord, hash_secret
from shared.keys import Keys
from shared.store import Store
from tests.support import RedisServer


@pytest.fixture
def store(redis_server: RedisServer) -> Store:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    return Store(client, Keys(f"u{uuid.uuid4().hex[:8]}"))


def _key(secret: bytes) -> KeyRecord:
    return KeyRecord(key_id="key_1", name="app", tenant="acme",
                     secret_hash=hash_secret(secret), models=["*"], rpm=60)


async def test_an_edit_racing_a_rotation_keeps_both(store: Store,
                                                    redis_server: RedisServer) -> None:
    await store.save_key(_key(b"old"))
    other = redis.Redis.from_url(redis_server.url, decode_responses=True)  # another router
    seen: list[str] = []

    def edit(rec: KeyRecord) -> None:
        seen.append(rec.secret_hash)
        rec.rpm = 600
        if len(seen) == 1:
            # Between this edit's read and its write, another router rotates the key.
            other.hset(store.k.api_keys("acme"), "key_1", _key(b"new").to_json())

    got = await store.update_key("acme", "key_1", edit)
    other.close()
    assert seen == [hash_secret(b"old"), hash_secret(b"new")]  # redone on the rotated key
    assert got is not None and got.rpm == 600 and got.secret_hash == hash_secret(b"new")
    stored = await store.get_key("key_1")
    assert stored is not None and stored.secret_hash == hash_secret(b"new") and stored.rpm == 600


async def test_an_update_of_a_revoked_key_writes_nothing(store: Store) -> None:
    await store.save_key(_key(b"s"))
    gone = await store.get_key("key_1")
    assert gone is not None and await store.delete_key(gone)
    version = await store.keys_version()
    assert await store.update_key("acme", "key_1", lambda rec: None) is None
    assert await store.get_key("key_1") is None and await store.keys_version() == version
