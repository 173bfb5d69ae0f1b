"""Who may call /v1: the router's local copy of every API key, and the check of one request.

The request path never asks Redis who a key is: keys are held here by the SHA-256 of their
secret, reloaded whole when the keys version moves. A change publishes a "keys" hint on the
events channel, so every router reloads within milliseconds; a version check every
KEYS_CHECK_S catches a hint that was lost, so a revocation holds everywhere within one
second either way (docs/keys.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from services.router.misses import MissRefresher
from shared.apikeys import KeyRecord, hash_secret
from shared.errors import Unauthorized
from shared.events import Nudger
from shared.settings import RouterSettings
from shared.store import Store

logger = logging.getLogger(__name__)

# A request admitted without a per-user key: by API_TOKEN (or the admin token on the ASGI
# path) or by an open endpoint. It has no limits.
TRUSTED = None


class KeyRing:
    def __init__(self, store: Store, nudger: Nudger, settings: RouterSettings) -> None:
        self.store = store
        self.settings = settings
        self.by_hash: dict[str, KeyRecord] = {}
        self.tenant_limits: dict[str, dict[str, int]] = {}
        self.version: int | None = None
        self.routers = 1  # routers seen checking in lately (limits split over them locally)
        self.loaded = False
        # A tenant was ever given a key: "auto" stays "keys" after the last one is revoked
        # (revoking every key must not open the endpoint).
        self.keyed = False
        self._hint = nudger.watch("keys")
        self._token = settings.api_token.encode() if settings.api_token else None
        # A key unknown here may have been created through another router a moment ago: it
        # waits for a reload begun after it arrived before its 401 (misses.py).
        self.misses = MissRefresher(self._load, what="key ring")

    @property
    def mode(self) -> str:
        """The effective AUTH_MODE: "auto" resolved against the keys that exist (or did)."""
        mode = self.settings.auth_mode
        if mode != "auto":
            return mode
        if self.keyed or not self.loaded:
            # Not loaded yet (Redis away at the start): closed until it is known whether
            # keys exist, never open by default; API_TOKEN still works meanwhile.
            return "keys"
        return "token" if self._token is not None else "open"

    def check(self, header: bytes | None, *extra: bytes) -> KeyRecord | None:
        """The key a request's ``Authorization`` header carries, None for a trusted request
        (API_TOKEN, one of ``extra``, or an open endpoint); raises 401 otherwise."""
        given = _bearer(header)
        mode = self.mode
        if given and mode != "token":
            rec = self.by_hash.get(hash_secret(given))
            if rec is not None:
                if rec.expired():
                    raise Unauthorized("this API key has expired")
                return rec
        if given:
            for t in (self._token, *extra):
                if t and hmac.compare_digest(given, t):
                    return TRUSTED
        if mode == "open":
            return TRUSTED
        raise Unauthorized("Incorrect API key provided." if given else
                           "You didn't provide an API key (Authorization: Bearer sk-...).")

    async def admit(self, header: bytes | None, *extra: bytes) -> KeyRecord | None:
        """``check``, but a bearer key unknown here is looked for again in a reload begun
        after the request arrived, so a key just created through another router works at
        once. Only the ASGI path waits; the fast lane hands such a request to it."""
        try:
            return self.check(header, *extra)
        except Unauthorized:
            given = _bearer(header)
            if not given or self.mode == "token" or hash_secret(given) in self.by_hash:
                raise
            await self.misses.after(time.monotonic())
            return self.check(header, *extra)

    # ------------------------------------------------------------------ keeping current
    async def reload(self) -> None:
        await self.misses.read()

    async def _load(self) -> None:
        version, self.routers = await self.store.check_in(self.settings.router_id)
        if version != self.version or not self.loaded:
            keys, limits, tenants = await self.store.all_keys()
            self.by_hash = {k.secret_hash: k for k in keys}
            # Sticky: a Redis that lost its data (restarted without persistence) must not
            # open an endpoint that had keys; only a restart of the router does.
            self.keyed = self.keyed or tenants > 0
            self.tenant_limits = limits
            self.version = version
            self.loaded = True

    async def first_load(self, timeout_s: float) -> None:
        """Load the keys before the router serves, so that its first requests are judged by
        them; without Redis (within ``timeout_s``) it starts closed (:attr:`mode`)."""
        try:
            await asyncio.wait_for(self.reload(), timeout_s)
        except Exception as e:  # noqa: BLE001 - Redis away: run() keeps trying
            logger.warning("API keys not loaded at start (%s): /v1 takes only API keys "
                           "and API_TOKEN until they are", e)

    async def run(self) -> None:
        last_error = 0.0
        while True:
            self._hint.clear()
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis away: keep the last copy, retry
                if time.monotonic() - last_error > 30:
                    logger.warning("cannot refresh API keys (%s); serving from the last copy",
                                   e)
                    last_error = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hint.wait(), self.settings.keys_check_s)


def _bearer(header: bytes | None) -> bytes | None:
    if not header:
        return None
    scheme, _, given = header.partition(b" ")
    given = given.strip()
    return given if scheme.lower() == b"bearer" and given else None
