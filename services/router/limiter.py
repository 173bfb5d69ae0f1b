"""RPM/TPM limits across routers, per-key concurrency and usage counters (docs/keys.md).

One admitted request costs at most one Redis round trip: a single EVALSHA of the GCRA script
over the key's and its tenant's buckets. A busy key's call also leases units for the
requests that follow on this router (spent here, without Redis, for LIMITS_LEASE_S), so its
round trips fall to one per lease. What happens after the answer (token reservations
corrected to the real usage, usage counters) is queued here and written by one pipeline
every LIMITS_FLUSH_S, whatever the number of requests behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError

from services.router.keyring import KeyRing
from shared.apikeys import KeyRecord
from shared.errors import RateLimited, StoreUnavailable
from shared.settings import RouterSettings
from shared.store import FLUSH_BATCH_MAX, Decision, FlushBatch, Store

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


# The most requests one lease asks for (beyond its own): a bound on the units a router can
# hold unspent, whatever the key's limit.
_LEASE_MAX = 64


@dataclass(slots=True)
class _Lease:
    """Units of one key's buckets this router took from Redis and spends locally until
    ``until`` (then drops: see docs/keys.md for why they are not given back)."""

    buckets: list[Bucket]  # the buckets they were taken from (new limits: a new lease)
    requests: int  # units left of the request buckets (a large number: none)
    tokens: int  # tokens left of the token buckets (likewise)
    until: float  # monotonic
    headers: dict[str, str]  # of the call that took it (remaining: see _local_headers)
    base: tuple[int, int]  # remaining requests and tokens in that answer, lease excluded
    want: int = 1  # requests the next call asks for, this one included (adaptive)


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


def _local_headers(lease: _Lease) -> dict[str, str]:
    """A request admitted from a lease: the headers of the call that took it, with what
    remains counted down locally (the reset times are those of that call, at most
    LIMITS_LEASE_S old)."""
    out = dict(lease.headers)
    if "x-ratelimit-remaining-requests" in out:
        out["x-ratelimit-remaining-requests"] = str(lease.base[0] + lease.requests)
    if "x-ratelimit-remaining-tokens" in out:
        out["x-ratelimit-remaining-tokens"] = str(lease.base[1] + lease.tokens)
    return out


def _reset(us: float) -> str:
    return f"{max(0.0, us) / _SECOND_US:.3f}s"


def headers_of(buckets: list[Bucket], decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the key's own buckets (units leased to this
    router count as remaining: they are); a model limit's buckets come last, so where the
    key has one for the model, the headers are the model's (as OpenAI's are per model)."""
    out: dict[str, str] = {}
    for b, ahead in zip(buckets, decision.ahead_us, strict=True):
        if b.key.rsplit(":", 2)[-2] == "tenant":
            continue
        unit = "tokens" if b.tokens else "requests"
        own = ahead - decision.leased[1 if b.tokens else 0] * b.interval_us
        remaining = max(0, math.floor(b.capacity - own / b.interval_us + (0 if b.tokens
                                                                            else 1e-9)))
        out[f"x-ratelimit-limit-{unit}"] = str(b.limit)
        out[f"x-ratelimit-remaining-{unit}"] = str(min(b.capacity, remaining))
        out[f"x-ratelimit-reset-{unit}"] = _reset(ahead)
    return out


# The most completion tokens one request reserves (2**24: past any model's context).
MAX_RESERVED_COMPLETION = 1 << 24


# The paths that generate, and the body fields each one's engine reads as the cap, in its
# order (vLLM ignores the other APIs' names); the last is the one the router sends (KeyGate).
CAP_FIELDS = {"v1/chat/completions": ("max_completion_tokens", "max_tokens"),
              "v1/completions": ("max_tokens",), "v1/responses": ("max_output_tokens",)}
# Audio transcription and translation write text too, but take no cap: the default stands.
_UNCAPPED = frozenset(("v1/audio/transcriptions", "v1/audio/translations"))


def _whole(value: object) -> int | None:
    """``value`` if it is a JSON integer of 0 or more (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _count(value: object) -> int:
    return _whole(value) or 0


def completion_cap(data: dict[str, Any], path: str) -> int | None:
    """The completion's cap as ``path``'s engine reads it: the first of its fields that is
    set (a null one is not); None when none is (0 is a cap: vLLM generates nothing)."""
    for name in CAP_FIELDS.get(path, ()):
        value = _whole(data.get(name))
        if value is not None:
            return value
    return None


def answers_of(data: dict[str, Any], path: str) -> int:
    """How many completions one request asks for: ``n`` (or ``best_of``, which vLLM
    generates in full), times the prompts of a /v1/completions list."""
    n = max(_count(data.get("n")), _count(data.get("best_of")), 1)
    prompt = data.get("prompt")
    if path == "v1/completions" and isinstance(prompt, list) and prompt \
            and all(isinstance(p, str | list) for p in prompt):
        n *= len(prompt)  # several prompts (a list of token ids alone is one)
    return min(n, 1024)


def estimate(data: dict[str, Any], body_len: int, path: str, default_max: int) -> int:
    """Tokens reserved at admission: the prompt from the body's size (about four bytes a
    token, an over-estimate for JSON), plus the completions' cap."""
    prompt = body_len // 4 + 1
    if path in _UNCAPPED:
        return prompt + default_max
    if path not in CAP_FIELDS:  # embeddings, scores, tokenize: no generation
        return prompt
    # No model writes more than MAX_RESERVED_COMPLETION in one answer. Unbounded, an
    # absurd max_tokens would put the buckets years ahead (every key of the tenant refused
    # until the refund) or past what the script's millisecond expiry can hold.
    given = completion_cap(data, path)
    cap = min(default_max if given is None else given, MAX_RESERVED_COMPLETION)
    return prompt + cap * answers_of(data, path)


class Limiter:
    def __init__(self, store: Store, ring: KeyRing, settings: RouterSettings) -> None:
        self.store = store
        self.ring = ring
        self.settings = settings
        self.concurrent: Counter[str] = Counter()
        self._local = _Local()
        self._down_until = 0.0
        # tenant -> bucket key -> microseconds; (tenant, hour) -> usage field -> count.
        self._corrections: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._usage: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
        # tenant -> its batches sent but not confirmed, in order (a lost reply, a failure
        # of that tenant's slot): sent again unchanged before anything newer of that
        # tenant, so Redis applies each once and in order (FLUSH_LUA); other tenants go on.
        self._unconfirmed: dict[str, list[FlushBatch]] = {}
        self._writer = f"{settings.router_id}:{uuid.uuid4().hex[:12]}"
        self._seq: Counter[str] = Counter()  # tenant -> the number of its last batch
        self._confirmed: Counter[str] = Counter()  # tenant -> its last batch confirmed
        self._warned_at = 0.0
        self.round_trips = 0  # limiter calls to Redis: at most one per request
        # Admissions that arrive while one call is in flight wait for it, then go together
        # in one pipeline: one round trip for all of them (throughput under concurrency).
        self._sending = False
        self._queue: list[tuple[list[str], list[float], asyncio.Future[Decision]]] = []
        self._drainer: asyncio.Task[None] | None = None  # held: a task nobody holds may vanish
        self._leases: dict[str, _Lease] = {}
        # A key's lease call in flight: its other requests wait for it, then spend locally.
        self._leasing: dict[str, asyncio.Future[None]] = {}
        # key id -> (record, its tenant's limits, buckets): built once per key version.
        self._buckets: dict[str, tuple[KeyRecord, dict[str, int] | None, list[Bucket]]] = {}

    @staticmethod
    def scope(rec: KeyRecord, alias: str, base: str | None = None) -> str:
        """What a key's buckets and lease are per: the key, or the key and the model when
        it has model limits."""
        if not rec.model_limits:
            return rec.key_id
        return f"{rec.key_id} {alias}" if base is None else f"{rec.key_id} {alias} {base}"

    def buckets(self, rec: KeyRecord, alias: str = "", base: str | None = None
                ) -> list[Bucket]:
        """The buckets a request of ``rec`` for model ``alias`` is charged to; ``base``: the
        base model when ``alias`` is a LoRA adapter (the limits of either apply)."""
        tenant = self.ring.tenant_limits.get(rec.tenant)
        scope = self.scope(rec, alias, base)
        got = self._buckets.get(scope)
        if got is not None and got[0] is rec and got[1] is tenant:
            return got[2]
        if len(self._buckets) > 100_000:  # revoked keys' entries do not pile up forever
            self._buckets.clear()
            self._leases.clear()
        out = self._build(rec, alias, base)
        self._buckets[scope] = (rec, tenant, out)
        return out

    def _build(self, rec: KeyRecord, alias: str, base: str | None) -> list[Bucket]:
        k, t = self.store.k, rec.tenant
        out = []
        if rec.rpm:
            out.append(_req_bucket(k.rate(t, rec.key_id, "req"), rec.rpm))
        if rec.tpm:
            out.append(_tok_bucket(k.rate(t, rec.key_id, "tok"), rec.tpm))
        for glob, lim in rec.model_limits_of(alias, *(() if base is None else (base,))):
            # One bucket pair per glob (shared by the models it matches), in the tenant's
            # slot like the others; the glob hashed, so any glob makes a plain key.
            scope = f"{rec.key_id}.m{hashlib.sha256(glob.encode()).hexdigest()[:16]}"
            if lim.get("rpm"):
                out.append(_req_bucket(k.rate(t, scope, "req"), lim["rpm"]))
            if lim.get("tpm"):
                out.append(_tok_bucket(k.rate(t, scope, "tok"), lim["tpm"]))
        tenant = self.ring.tenant_limits.get(t)
        if tenant:
            if tenant.get("rpm"):
                out.append(_req_bucket(k.rate(t, "tenant", "req"), tenant["rpm"]))
            if tenant.get("tpm"):
                out.append(_tok_bucket(k.rate(t, "tenant", "tok"), tenant["tpm"]))
        return out

    async def admit(self, rec: KeyRecord, alias: str, reserved: int, base: str | None = None
                    ) -> Ticket:
        """Admit one request of ``rec`` for model ``alias`` (booked under that name; ``base``
        as in :meth:`buckets`) or raise 429 (or 503 with Redis down and "deny")."""
        if rec.max_concurrent:
            cap = max(1, math.ceil(rec.max_concurrent / self.ring.routers))
            if self.concurrent[rec.key_id] >= cap:
                self.count(rec, alias, rate_limited=1)
                raise RateLimited(f"Too many concurrent requests for key {rec.name} (at most "
                                  f"{rec.max_concurrent}).", kind="requests",
                                  headers={"Retry-After": "1"})
        # Taken before any wait for Redis: requests that arrive together all wait for the
        # same call, and counted after it they would all have passed the check above.
        self.concurrent[rec.key_id] += 1
        try:
            buckets = self.buckets(rec, alias, base)
            if not buckets:
                return Ticket(rec, alias, reserved, buckets, {}, True)
            scope = self.scope(rec, alias, base)
            lease = await self._leased(scope, buckets, reserved)
            if lease is not None:
                return Ticket(rec, alias, reserved, buckets, _local_headers(lease), True)
            decision, remote, sent = await self._decide(scope, buckets, reserved)
            headers = headers_of(buckets, decision)
            if remote and decision.admitted and self.settings.limits_lease_s > 0:
                self._lease(scope, buckets, decision, headers, sent)
            if not decision.admitted:
                self.count(rec, alias, rate_limited=1)
                headers["Retry-After"] = str(max(1, math.ceil(decision.retry_us / _SECOND_US)))
                kind = self._which(buckets, decision)
                raise RateLimited(f"Rate limit reached for key {rec.name} on {kind} per "
                                  f"minute. Retry in {headers['Retry-After']}s.", kind=kind,
                                  headers=headers)
            return Ticket(rec, alias, reserved, buckets, headers, remote)
        except BaseException:  # refused, failed or cancelled: the slot goes back
            self._release(rec.key_id)
            raise

    def _release(self, key_id: str) -> None:
        self.concurrent[key_id] -= 1
        if self.concurrent[key_id] <= 0:
            del self.concurrent[key_id]

    @staticmethod
    def _which(buckets: list[Bucket], decision: Decision) -> str:
        over = [b for b, a in zip(buckets, decision.ahead_us, strict=True) if a > b.tau_us]
        return "tokens" if over and all(b.tokens for b in over) else "requests"

    async def _leased(self, key_id: str, buckets: list[Bucket], reserved: int
                      ) -> _Lease | None:
        """The key's lease on this router, with this request spent from it; None when it
        has not enough left (the request goes to Redis, and takes a new lease)."""
        while True:
            lease = self._leases.get(key_id)
            if lease is not None and lease.buckets is buckets:
                if time.monotonic() < lease.until:
                    if lease.requests >= 1 and lease.tokens >= reserved:
                        lease.requests -= 1
                        lease.tokens -= reserved
                        return lease
                    # Spent within its time: the next lease asks for twice as much (once:
                    # the lease now counts as lapsed, with nothing left).
                    lease.want = min(lease.want * 2, _LEASE_MAX)
                    lease.until, lease.requests = -1.0, 0
                elif lease.requests >= 1 and lease.tokens >= 1 and lease.want > 1:
                    # Units left over when it lapsed: ask for less next time.
                    lease.want //= 2
                    lease.requests = 0  # lapsed: whatever is left is dropped
            pending = self._leasing.get(key_id)
            if pending is None:
                return None
            await asyncio.shield(pending)  # a lease on its way: spend from it

    def _wanted(self, key_id: str, buckets: list[Bucket], reserved: int) -> tuple[int, int]:
        """Requests and tokens to lease beyond this request: what the key used in one
        lease time lately, no more than LIMITS_LEASE_S of any of its limits."""
        lease_s = self.settings.limits_lease_s
        lease = self._leases.get(key_id)
        n = (lease.want if lease is not None and lease.buckets is buckets else 1) - 1
        for b in buckets:
            cap = int(lease_s * _SECOND_US / b.interval_us)
            n = min(n, cap // max(1, reserved) if b.tokens else cap - 1)
        return (n, n * reserved) if n > 0 else (0, 0)

    async def _decide(self, key_id: str, buckets: list[Bucket], reserved: int
                      ) -> tuple[Decision, bool, float]:
        """The decision, whether Redis made it, and when the call was sent (a lease runs
        from then: its units were charged after it)."""
        sent = time.monotonic()
        if sent >= self._down_until:
            args: list[float] = []
            for b in buckets:
                args += [b.interval_us, b.tau_us, reserved if b.tokens else 1]
            requests, tokens = self._wanted(key_id, buckets, reserved)
            leasing = requests > 0 or tokens > 0
            if leasing:
                args += [requests, tokens, *(2 if b.tokens else 1 for b in buckets)]
                done = asyncio.get_running_loop().create_future()
                self._leasing[key_id] = done
            try:
                return await self._remote([b.key for b in buckets], args), True, sent
            except (RedisError, OSError) as e:
                logger.warning("rate limiter cannot reach Redis (%s); LIMITS_ON_REDIS_DOWN=%s "
                               "for %.0f s", e, self.settings.limits_on_redis_down, _DOWN_S)
                self._down_until = time.monotonic() + _DOWN_S
            finally:
                if leasing:
                    del self._leasing[key_id]
                    done.set_result(None)
        if self.settings.limits_on_redis_down == "deny":
            raise StoreUnavailable("rate limits cannot be checked now (Redis is unreachable "
                                   "and LIMITS_ON_REDIS_DOWN=deny); retry")
        costs = [reserved if b.tokens else 1 for b in buckets]
        return self._local.decide(buckets, costs, self.ring.routers), False, sent

    def _lease(self, key_id: str, buckets: list[Bucket], decision: Decision,
               headers: dict[str, str], sent: float) -> None:
        """Keep what the call granted (maybe nothing: the lease then only tells the next
        request of the key that it came within a lease time, so that it asks for more)."""
        old = self._leases.get(key_id)
        want = old.want if old is not None and old.buckets is buckets else 1
        requests, tokens = decision.leased
        has_req = any(not b.tokens for b in buckets)
        has_tok = any(b.tokens for b in buckets)
        base = (int(headers.get("x-ratelimit-remaining-requests", 0)) - requests,
                int(headers.get("x-ratelimit-remaining-tokens", 0)) - tokens)
        self._leases[key_id] = _Lease(
            buckets, requests if has_req else 1 << 62, tokens if has_tok else 1 << 62,
            sent + self.settings.limits_lease_s, headers,
            (max(0, base[0]), max(0, base[1])), want)

    async def _remote(self, keys: list[str], args: list[float]) -> Decision:
        if self._sending:
            fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            self._queue.append((keys, args, fut))
            return await fut
        # Nothing in flight: this request goes at once, alone (no added latency at c=1).
        self._sending = True
        try:
            self.round_trips += 1
            return await self.store.limit(keys, args)
        finally:
            if self._queue:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            else:
                self._sending = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.round_trips += 1
                try:
                    decisions = await self.store.limit_many([(k, a) for k, a, _ in batch])
                except Exception as e:  # noqa: BLE001 - every waiter gets the failure
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), d in zip(batch, decisions, strict=True):
                    if not fut.done():
                        fut.set_result(d)
        finally:
            self._sending = False

    def finish(self, ticket: Ticket, *, used: int | None, prompt: int = 0,
               completion: int = 0, error: bool = False) -> None:
        """The answer is over: free the concurrency slot, queue the correction of the
        reservation to ``used`` tokens (None: the estimate stands) and the usage counts."""
        if ticket.done:
            return
        ticket.done = True
        rec = ticket.rec
        self._release(rec.key_id)
        if used is not None and used != ticket.reserved:
            delta = used - ticket.reserved
            for b in ticket.buckets:
                if b.tokens:
                    if ticket.remote:
                        self._corrections[rec.tenant][b.key] += delta * b.interval_us
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
        """Write the corrections and usage counts gathered since the last flush, in one
        round trip. A tenant's batches that could not be confirmed go first, unchanged, and
        what it gathered meanwhile waits for them (Redis skips those it had applied).
        Raises when the round trip failed; a tenant's failure is logged, the others land."""
        for b in self._take(skip=self._unconfirmed.keys()):
            self._unconfirmed.setdefault(b.tenant, []).append(b)
        batches = [b for pending in self._unconfirmed.values() for b in pending]
        if not batches:
            return
        done = await self.store.flush(self._writer, batches, self._confirmed)
        confirmed = {id(b) for b, ok in zip(batches, done, strict=True) if ok}
        for tenant in list(self._unconfirmed):
            pending = self._unconfirmed[tenant]
            while pending and id(pending[0]) in confirmed:
                self._confirmed[tenant] = pending.pop(0).seq
            if not pending:
                del self._unconfirmed[tenant]
        if self._unconfirmed and time.monotonic() - self._warned_at > 30:
            self._warned_at = time.monotonic()
            logger.warning("usage flush: batches of %d tenants (%s) not confirmed; sent "
                           "again until they are", len(self._unconfirmed),
                           ", ".join(sorted(self._unconfirmed)[:5]))

    async def flush_all(self, rounds: int = 3) -> None:
        """Flush until nothing is left (a router's last flush): a round that confirms a
        tenant's resent batches leaves its newer counts for the next."""
        for _ in range(rounds):
            await self.flush()
            if not self._unconfirmed and not self._corrections and not self._usage:
                return

    def _take(self, skip: Iterable[str] = ()) -> list[FlushBatch]:
        """What was gathered for every tenant not in ``skip``, as that tenant's next
        batches (at most FLUSH_BATCH_MAX entries each); their counters start again."""
        held = set(skip)
        # tenant -> (None: a correction, else the usage hour; bucket key or field; amount)
        per: dict[str, list[tuple[int | None, str, float]]] = defaultdict(list)
        for tenant in [t for t in self._corrections if t not in held]:
            per[tenant] += [(None, k, d) for k, d in self._corrections.pop(tenant).items()]
        for tenant, hour in sorted(k for k in self._usage if k[0] not in held):
            per[tenant] += [(hour, f, n) for f, n in self._usage.pop((tenant, hour)).items()]
        out = []
        for tenant, entries in sorted(per.items()):
            for i in range(0, len(entries), FLUSH_BATCH_MAX):
                corrections: dict[str, float] = {}
                usage: dict[int, dict[str, int]] = {}
                for at, name, n in entries[i:i + FLUSH_BATCH_MAX]:
                    if at is None:
                        corrections[name] = n
                    else:
                        usage.setdefault(at, {})[name] = int(n)
                self._seq[tenant] += 1
                out.append(FlushBatch(tenant, self._seq[tenant], corrections, usage))
        return out

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.limits_flush_s)
            try:
                await self.flush()
            except (RedisError, OSError) as e:
                logger.debug("usage flush failed (%s); sent again at the next one", e)


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
