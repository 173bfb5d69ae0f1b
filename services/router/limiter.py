"""RPM/TPM limits across routers, per-key concurrency and usage counters (docs/keys.md).

One admitted request costs one Redis round trip: a single EVALSHA of the GCRA script over
the key's and its tenant's buckets. What happens after the answer (token reservations
corrected to the real usage, usage counters) is queued here and written by one pipeline
every LIMITS_FLUSH_S, whatever the number of requests behind it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError

from services.router.keyring import KeyRing
from shared.apikeys import KeyRecord
from shared.errors import RateLimited, StoreUnavailable
from shared.settings import RouterSettings
from shared.store import Decision, Store

logger = logging.getLogger(__name__)

_MINUTE_US = 60_000_000
_SECOND_US = 1_000_000
# After a failed call, Redis is not tried again for this long (requests use the policy),
# so a dead Redis costs one timeout per second, not one per request.
_DOWN_S = 1.0


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    interval_us: float  # microseconds per unit
    tau_us: float
    capacity: int  # units a full bucket admits at once (for the headers)
    limit: int
    tokens: bool


def _req_bucket(key: str, rpm: int) -> Bucket:
    # Burst: one second's share of the minute (at least one request).
    interval = _MINUTE_US / rpm
    burst = max(1, math.ceil(rpm / 60))
    return Bucket(key, interval, (burst - 1) * interval, burst, rpm, False)


def _tok_bucket(key: str, tpm: int) -> Bucket:
    # Tokens: admitted while at most one second's share is outstanding (debt, then charged).
    interval = _MINUTE_US / tpm
    return Bucket(key, interval, _SECOND_US, max(1, tpm // 60), tpm, True)


@dataclass(slots=True)
class Ticket:
    """One admitted request of a key, until its answer ends."""

    rec: KeyRecord
    alias: str
    reserved: int
    buckets: list[Bucket]
    headers: dict[str, str]
    remote: bool  # charged in Redis (corrections go there), else in the local fallback
    done: bool = False


@dataclass
class _Local:
    """The Redis-down fallback: the same GCRA in this process, on a share of each limit."""

    tats: dict[str, float] = field(default_factory=dict)

    def decide(self, buckets: list[Bucket], costs: list[int], share: int) -> Decision:
        now = time.monotonic() * _SECOND_US
        tats = [max(self.tats.get(b.key, 0.0), now) for b in buckets]
        retry = max([t - now - b.tau_us for t, b in zip(tats, buckets, strict=True)] + [0])
        if retry > 0:
            return Decision(False, math.ceil(retry), [int(t - now) for t in tats])
        ahead = []
        for b, t, c in zip(buckets, tats, costs, strict=True):
            self.tats[b.key] = t + c * b.interval_us * share
            ahead.append(int(self.tats[b.key] - now))
        return Decision(True, 0, ahead)


def _reset(us: float) -> str:
    return f"{max(0.0, us) / _SECOND_US:.3f}s"


def headers_of(buckets: list[Bucket], decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the key's own buckets."""
    out: dict[str, str] = {}
    for b, ahead in zip(buckets, decision.ahead_us, strict=True):
        if b.key.rsplit(":", 2)[-2] == "tenant":
            continue
        unit = "tokens" if b.tokens else "requests"
        remaining = max(0, math.floor(b.capacity - ahead / b.interval_us + (0 if b.tokens
                                                                              else 1e-9)))
        out[f"x-ratelimit-limit-{unit}"] = str(b.limit)
        out[f"x-ratelimit-remaining-{unit}"] = str(min(b.capacity, remaining))
        out[f"x-ratelimit-reset-{unit}"] = _reset(ahead)
    return out


def estimate(data: dict[str, Any], body_len: int, path: str, default_max: int) -> int:
    """Tokens reserved at admission: the prompt from the body's size (about four bytes a
    token, an over-estimate for JSON), plus the completion's cap."""
    prompt = body_len // 4 + 1
    if path.endswith("embeddings"):
        return prompt
    cap = data.get("max_completion_tokens", data.get("max_tokens"))
    return prompt + (cap if isinstance(cap, int) and cap > 0 else default_max)


class Limiter:
    def __init__(self, store: Store, ring: KeyRing, settings: RouterSettings) -> None:
        self.store = store
        self.ring = ring
        self.settings = settings
        self.concurrent: Counter[str] = Counter()
        self._local = _Local()
        self._down_until = 0.0
        self._corrections: dict[str, float] = defaultdict(float)
        self._usage: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
        self.round_trips = 0  # EVALSHA calls made: one per admitted (or refused) request

    def buckets(self, rec: KeyRecord) -> list[Bucket]:
        k, t = self.store.k, rec.tenant
        out = []
        if rec.rpm:
            out.append(_req_bucket(k.rate(t, rec.key_id, "req"), rec.rpm))
        if rec.tpm:
            out.append(_tok_bucket(k.rate(t, rec.key_id, "tok"), rec.tpm))
        tenant = self.ring.tenant_limits.get(t)
        if tenant:
            if tenant.get("rpm"):
                out.append(_req_bucket(k.rate(t, "tenant", "req"), tenant["rpm"]))
            if tenant.get("tpm"):
                out.append(_tok_bucket(k.rate(t, "tenant", "tok"), tenant["tpm"]))
        return out

    async def admit(self, rec: KeyRecord, alias: str, reserved: int) -> Ticket:
        """Admit one request of ``rec`` or raise 429 (or 503 with Redis down and "deny")."""
        if rec.max_concurrent:
            cap = max(1, math.ceil(rec.max_concurrent / self.ring.routers))
            if self.concurrent[rec.key_id] >= cap:
                self.count(rec, alias, rate_limited=1)
                raise RateLimited(f"Too many concurrent requests for key {rec.name} (at most "
                                  f"{rec.max_concurrent}).", kind="requests",
                                  headers={"Retry-After": "1"})
        buckets = self.buckets(rec)
        costs = [reserved if b.tokens else 1 for b in buckets]
        decision, remote = (await self._decide(buckets, costs)) if buckets else (
            Decision(True, 0, []), True)
        headers = headers_of(buckets, decision)
        if not decision.admitted:
            self.count(rec, alias, rate_limited=1)
            headers["Retry-After"] = str(max(1, math.ceil(decision.retry_us / _SECOND_US)))
            kind = self._which(buckets, decision)
            raise RateLimited(f"Rate limit reached for key {rec.name} on {kind} per minute. "
                              f"Retry in {headers['Retry-After']}s.", kind=kind,
                              headers=headers)
        self.concurrent[rec.key_id] += 1
        return Ticket(rec, alias, reserved, buckets, headers, remote)

    @staticmethod
    def _which(buckets: list[Bucket], decision: Decision) -> str:
        over = [b for b, a in zip(buckets, decision.ahead_us, strict=True) if a > b.tau_us]
        return "tokens" if over and all(b.tokens for b in over) else "requests"

    async def _decide(self, buckets: list[Bucket], costs: list[int]) -> tuple[Decision, bool]:
        if time.monotonic() >= self._down_until:
            args: list[float] = []
            for b, c in zip(buckets, costs, strict=True):
                args += [b.interval_us, b.tau_us, c]
            try:
                self.round_trips += 1
                return await self.store.limit([b.key for b in buckets], args), True
            except (RedisError, OSError) as e:
                logger.warning("rate limiter cannot reach Redis (%s); LIMITS_ON_REDIS_DOWN=%s "
                               "for %.0f s", e, self.settings.limits_on_redis_down, _DOWN_S)
                self._down_until = time.monotonic() + _DOWN_S
        if self.settings.limits_on_redis_down == "deny":
            raise StoreUnavailable("rate limits cannot be checked now (Redis is unreachable "
                                   "and LIMITS_ON_REDIS_DOWN=deny); retry")
        return self._local.decide(buckets, costs, self.ring.routers), False

    def finish(self, ticket: Ticket, *, used: int | None, prompt: int = 0,
               completion: int = 0, error: bool = False) -> None:
        """The answer is over: free the concurrency slot, queue the correction of the
        reservation to ``used`` tokens (None: the estimate stands) and the usage counts."""
        if ticket.done:
            return
        ticket.done = True
        rec = ticket.rec
        self.concurrent[rec.key_id] -= 1
        if self.concurrent[rec.key_id] <= 0:
            del self.concurrent[rec.key_id]
        if used is not None and used != ticket.reserved:
            delta = used - ticket.reserved
            for b in ticket.buckets:
                if b.tokens:
                    if ticket.remote:
                        self._corrections[b.key] += delta * b.interval_us
                    elif b.key in self._local.tats:
                        self._local.tats[b.key] += delta * b.interval_us * self.ring.routers
        self.count(rec, ticket.alias, requests=1, prompt_tokens=prompt,
                   completion_tokens=completion, errors=int(error))

    def count(self, rec: KeyRecord, alias: str, **counters: int) -> None:
        hour = int(time.time()) // 3600 * 3600
        usage = self._usage[(rec.tenant, hour)]
        for name, n in counters.items():
            if n:
                usage[f"{rec.key_id}|{alias}|{name}"] += n

    async def flush(self) -> None:
        corrections, self._corrections = self._corrections, defaultdict(float)
        usage, self._usage = self._usage, defaultdict(Counter)
        if not corrections and not usage:
            return
        try:
            await self.store.flush(dict(corrections), {k: dict(v) for k, v in usage.items()})
        except (RedisError, OSError):
            # Kept for the next flush (usage would otherwise be lost while Redis is away).
            for k, d in corrections.items():
                self._corrections[k] += d
            for uk, c in usage.items():
                self._usage[uk].update(c)
            raise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.limits_flush_s)
            try:
                await self.flush()
            except (RedisError, OSError) as e:
                logger.debug("usage flush failed (%s); kept for the next one", e)


def usage_of(data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI ``usage`` object, or None."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def usage_of_body(body: bytes) -> tuple[int, int] | None:
    if b'"usage"' not in body:
        return None
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def usage_of_stream(tail: bytes) -> tuple[int, int] | None:
    """The usage of a stream's final usage chunk (``stream_options.include_usage``), from
    the last bytes of the stream; None when it sent none."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"data: ", 0, at)
    end = tail.find(b"\n", at)
    if start < 0:
        return None
    try:
        return usage_of(orjson.loads(tail[start + 6:end if end >= 0 else len(tail)]))
    except orjson.JSONDecodeError:
        return None
