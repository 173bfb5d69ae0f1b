"""Store foundations: the client, the named errors, and what every part of the store shares.

Only the ``shared.store`` package talks to Redis. Every multi-key change is one MULTI/EXEC
transaction. Writes that only the scheduling leader may make are *fenced*: they WATCH the lease
key and run only while it still holds this manager's ``holder|epoch`` token, so a manager that
lost its lease cannot place anything. Keys are named in :mod:`shared.keys`; docs/redis.md
explains them.

On Redis Cluster (``REDIS_CLUSTER_NODES``) every transaction and script keeps to one hash slot
(the keys' hash tags, see :mod:`shared.keys`). The few writes that also bump a change counter
of the ``{s}`` slot, or that span the scheduler's slot and a model's or a worker's, run there
as ordered steps, each atomic in its slot (``self.cluster`` selects them); docs/redis.md,
"Redis Cluster", says why each split is safe. On a single Redis they stay one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from shared.errors import is_data_error
from shared.keys import Keys
from shared.models import ModelSpec
from shared.records import BadRecord, Problems
from shared.store.cluster import Primaries, Scatter


class NotLeader(Exception):
    """A fenced write was refused: the lease is not (or no longer) held by this token."""


@dataclass(frozen=True)
class StoredModel:
    spec: ModelSpec
    version: str
    created_at: float
    hold: str | None = None
    # The spec's JSON as stored (what the admin views show, without serialising it again).
    spec_json: str = ""


def spec_fingerprint(spec: ModelSpec) -> str:
    # Fields left at their defaults are not part of it, so a field added to the spec later
    # (e.g. max_inflight) does not make an unchanged registration look like another spec.
    return hashlib.sha256(orjson.dumps(spec.model_dump(exclude_defaults=True),
                                       option=orjson.OPT_SORT_KEYS)).hexdigest()


# Approximate cap of the change logs (Redis trims whole nodes, so it keeps at least this many).
# A log only has to cover the changes between two passes of a router (about a second); a
# router that fell further behind reloads everything.
ROUTES_LOG_MAXLEN = 5000

# INCR of a version counter, which first repairs a counter someone corrupted (a string that
# is not an integer, a key of another type): the counter restarts from Redis's clock in
# microseconds, above any count it had, so every reader sees it move and reloads everything.
# Without it one `SET svllm:version:routes abc` made every route change fail for good.
BUMP_FN_LUA = """
local function bump(k)
  local t = redis.call('TYPE', k)['ok']
  if t ~= 'none' and t ~= 'string' then redis.call('DEL', k) end
  local v = redis.call('GET', k)
  if v and (#v > 17 or not string.match(v, '^%-?[1-9]%d*$')) and v ~= '0' then
    local now = redis.call('TIME')
    redis.call('SET', k, now[1] .. string.format('%06d', tonumber(now[2])))
  end
  return redis.call('INCR', k)
end
"""
_BUMP_LUA = BUMP_FN_LUA + "return bump(KEYS[1])"
# Bump KEYS[1] and log ARGV[1] in the stream KEYS[2] (capped at about ARGV[2] entries); a log
# key of another type is replaced (readers then reload everything: the count is off).
LOG_CHANGE_FN_LUA = BUMP_FN_LUA + """
local function log_change(counter, log, alias, maxlen)
  local t = redis.call('TYPE', log)['ok']
  if t ~= 'none' and t ~= 'stream' then redis.call('DEL', log) end
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', 'alias', alias)
  return bump(counter)
end
"""
_LOG_CHANGE_LUA = LOG_CHANGE_FN_LUA + "return log_change(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"

# Many single-key reads in one script call (StoreBase._reads): each reply as that command's
# own, an error reply (a key of another type) in its place instead of failing the call.
_READS_LUA = """
local ops = {}
for op in string.gmatch(ARGV[1], "%S+") do ops[#ops + 1] = op end
local out, i, n = {}, 0, #ops
for key in string.gmatch(ARGV[2], "[^\\n]+") do
  out[i + 1] = redis.pcall(ops[i % n + 1], key)
  i = i + 1
end
return out
"""
# Reads per script call: ~2 ms of Redis time for small hashes, so other clients (routers'
# limit checks) wait at most that long behind a full pass's reads.
_READS_CHUNK = 500
# The script costs Redis two to three times a plain command's CPU per key (3-7 against
# 1.5-2.5 µs: Lua's pcall and reply conversion) and saves the client ~20 µs per key: worth
# it for the scheduler's full pass, not for the steady state's small reads (a worker's own
# models, the aliases one tick touches), which stay pipelined and cost Redis what they did.
_READS_SCRIPT_MIN = 2000
_READ_OPS = frozenset({"GET", "HGETALL", "HKEYS", "SMEMBERS", "EXISTS", "PTTL"})

_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
_MAX_CONNECTIONS = 128
# A pooled connection broken by a Redis restart fails once; retrying on a fresh connection
# turns that into a short delay instead of an error (a real outage still fails fast).
_RETRY: dict[str, Any] = {
    "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    "retry_on_error": [RedisConnectionError, RedisTimeoutError],
}


def _addresses(nodes: str) -> list[tuple[str, int]]:
    """"host:port,host:port" as (host, port) pairs (host defaults to loopback)."""
    addrs = []
    for item in nodes.split(","):
        host, _, port = item.strip().rpartition(":")
        addrs.append((host or "127.0.0.1", int(port)))
    return addrs


def connect(url: str, sentinels: str | None = None, master: str = "mymaster",
            cluster_nodes: str | None = None) -> aioredis.Redis:
    """A pooled client; short timeouts so a dead Redis gives a quick, clear error.

    With ``sentinels`` ("host:port,host:port"), the client asks Redis Sentinel for the current
    primary of ``master`` and asks again after a connection fails, so a promoted replica is
    found without restarting anything. With ``cluster_nodes`` (some nodes of a Redis Cluster,
    "host:port,..."), redis-py's cluster client finds the rest and routes each command to the
    node of its slot; it serves the store's commands like ``aioredis.Redis`` (hence the cast).
    """
    if cluster_nodes:
        startup = [ClusterNode(host, port) for host, port in _addresses(cluster_nodes)]
        return cast(aioredis.Redis, RedisCluster(
            startup_nodes=startup, decode_responses=True, max_connections=_MAX_CONNECTIONS,
            **_TIMEOUTS, **_RETRY))
    if not sentinels:
        # A blocking pool: a burst (hundreds of held requests) waits for a connection instead
        # of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=_MAX_CONNECTIONS, timeout=10,
            **_TIMEOUTS, **_RETRY)
        return aioredis.Redis(connection_pool=pool)
    sentinel = Sentinel(_addresses(sentinels), sentinel_kwargs=_TIMEOUTS,
                        decode_responses=True, **_TIMEOUTS)
    client = sentinel.master_for(master, decode_responses=True, **_TIMEOUTS, **_RETRY)
    return cast(aioredis.Redis, client)


class StoreBase:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events: bool = True) -> None:
        self.r = client
        self.k = keys
        # Redis Cluster: multi-slot writes run as ordered single-slot steps (module docstring).
        self.cluster = isinstance(client, RedisCluster)
        # Cluster: plain connections to its primaries, for transactions and batches.
        self._primaries = Primaries(cast(RedisCluster, client), {
            "decode_responses": True, "max_connections": _MAX_CONNECTIONS, **_TIMEOUTS,
            **_RETRY}) if self.cluster else None
        self.events_enabled = events
        # Bad records this process has read (and skipped): see shared.records.
        self.problems = Problems()
        # Script text -> its SHA1 on this Redis, once loaded (EVALSHA; reloaded on NOSCRIPT).
        self._shas: dict[str, str] = {}
        # Parsed specs by alias, with the JSON they came from (ModelsStore._spec).
        self._specs: dict[str, tuple[str, ModelSpec]] = {}
        self._reads_script = client.register_script(_READS_LUA)
        # The scheduler's liveness probe: its worker list, that list's length, and the probe
        # packed for them (SchedulingStore._probe_packed).
        self._probe_cache: tuple[list[str], int, bytes] | None = None

    async def close(self) -> None:
        if self._primaries is not None:
            await self._primaries.close()
        await self.r.aclose()

    @contextlib.asynccontextmanager
    async def _txn(self, key: str) -> AsyncIterator[Pipeline]:
        """A MULTI/EXEC pipeline (WATCH too) for keys in ``key``'s hash slot.

        On a cluster, on a plain connection to the primary of the slot
        (:mod:`shared.store.cluster`)."""
        if self._primaries is None:
            async with self.r.pipeline(transaction=True) as pipe:
                yield pipe
            return
        async with self._primaries.txn(key) as pipe:
            yield pipe

    @contextlib.asynccontextmanager
    async def _batch(self) -> AsyncIterator[Pipeline]:
        """A non-transactional pipeline (reads of many keys in one round trip); on a
        cluster, one per primary, sent together (:class:`shared.store.cluster.Scatter`)."""
        if self._primaries is None:
            async with self.r.pipeline(transaction=False) as pipe:
                yield pipe
            return
        yield cast(Pipeline, Scatter(self._primaries))

    async def _members(self, key: str) -> list[str]:
        return sorted(cast(set[str], await self.r.smembers(key)))

    async def _hashes(self, keys: list[str]) -> list[dict[str, str]]:
        """HGETALL of every key (empty dicts for missing keys, and for keys of another type,
        which are reported)."""
        replies = await self._reads(keys, ("HGETALL",))
        return [self._checked(k, r, {}) for k, r in zip(keys, replies, strict=True)]

    async def _reads(self, keys: list[str], ops: tuple[str, ...]) -> list[Any]:
        """The reply to a read of each of ``keys``, key i read with ``ops[i % len(ops)]``
        (GET, HGETALL, HKEYS, SMEMBERS, EXISTS or PTTL), as redis-py's own method gives it; an
        error reply (a key of another type) as an exception object in its place.

        A full scheduler pass reads 300,000 keys at 50,000 aliases; a pipelined command each
        cost ~25 µs of redis-py (packing every argument, a parse with a timeout per reply),
        most of the pass. So, for ``_READS_SCRIPT_MIN`` keys or more and without a cluster,
        a script reads ``_READS_CHUNK`` of them at a time: the keys go as one newline-joined
        argument and the replies come back as one nested reply, which hiredis parses in C.
        Fewer keys, a cluster (keys of many slots cannot share a script), or a chunk with a
        key the joined form cannot carry: one pipelined command each."""
        assert set(ops) <= _READ_OPS and ops, ops
        if self._primaries is not None or len(keys) < _READS_SCRIPT_MIN:
            return await self._piped(keys, ops)
        step = _READS_CHUNK - _READS_CHUNK % len(ops)  # each chunk starts at ops[0]
        spec = " ".join(ops)
        out: list[Any] = []
        for i in range(0, len(keys), step):
            chunk = keys[i:i + step]
            joined = "\n".join(chunk)
            if joined.count("\n") != len(chunk) - 1 or not all(chunk):
                out += await self._piped(chunk, ops)
                continue
            replies = await self._reads_script(keys=[], args=[spec, joined])
            out += [_shaped(ops[j % len(ops)], r) for j, r in enumerate(replies)]
        return out

    async def _piped(self, keys: list[str], ops: tuple[str, ...]) -> list[Any]:
        """_reads as one pipelined command per key."""
        async with self._batch() as pipe:
            for i, key in enumerate(keys):
                getattr(pipe, ops[i % len(ops)].lower())(key)
            return await pipe.execute(raise_on_error=False)

    async def _mget(self, keys: list[str]) -> list[Any]:
        """GET of every key in one call; on a cluster, a pipeline of GETs per primary, all
        at once (keys of several workers or models are in several slots; readers need no
        snapshot of them; redis-py's ``mget_nonatomic`` took three times as long)."""
        if not keys:
            return []
        if not self.cluster:
            return cast(list[Any], await self.r.mget(keys))
        async with self._batch() as pipe:
            for key in keys:
                pipe.get(key)
            return await pipe.execute()

    async def _commit(self, key: str, build: Callable[[Pipeline], None],
                      changes: list[tuple[str, str, str]]) -> None:
        """``build``'s commands (keys of ``key``'s slot) in one transaction, with a change logged
        for each (counter, log, alias) of ``changes``.

        On a single Redis all of it is one MULTI/EXEC. On a cluster the counters and logs
        live in the ``{s}`` slot, so they are bumped right after the write lands, in a second
        transaction: a router that sees the bump then reads the change, and one that read the
        counter before it reads the change at its next bump (a process that dies in between
        leaves the change unlogged until the next bump of that alias, or the dead worker's
        cleanup, which makes routers reload everything)."""
        async with self._txn(key) as pipe:
            build(pipe)
            if not self.cluster:
                for counter, log, alias in changes:
                    self._log_change(pipe, counter, log, alias)
            await pipe.execute()
        if self.cluster and changes:
            async with self._txn(changes[0][0]) as pipe:
                for counter, log, alias in changes:
                    self._log_change(pipe, counter, log, alias)
                await pipe.execute()

    def _checked(self, key: str, reply: Any, default: Any) -> Any:
        """A pipelined reply, or ``default`` (the key reported) when Redis refused the
        command for its data: a key of the wrong type must not take a whole read down. Any
        other error reply (LOADING, BUSY, NOPERM, a cluster's TRYAGAIN) is raised: read as
        empty, it would drop live records (every API key of a tenant, a worker's
        assignments) until their next change."""
        if isinstance(reply, Exception):
            if not is_data_error(reply):
                raise reply
            self._skip(BadRecord(key, str(reply)))
            return default
        return reply

    def _skip(self, err: BadRecord) -> None:
        """A record that does not parse: reported, left out of the answer."""
        self.problems.report(err)

    def _bump(self, pipe: Pipeline, counter: str) -> None:
        """Inside a transaction: INCR ``counter``, repairing it first if it was corrupted."""
        pipe.eval(_BUMP_LUA, 1, counter)

    def _log_change(self, pipe: Pipeline, counter: str, log: str, alias: str) -> None:
        """Inside a transaction: bump ``counter`` by one and log ``alias`` with it (always
        both: routers count a log's new entries against its counter's move)."""
        pipe.eval(_LOG_CHANGE_LUA, 2, counter, log, alias, ROUTES_LOG_MAXLEN)

    def _model_changed(self, alias: str) -> tuple[str, str, str]:
        """The change to log (:meth:`_commit`) for a write to a model or its hold."""
        return self.k.models_version, self.k.models_log, alias

    def _intent_changed(self, alias: str) -> tuple[str, str, str]:
        """The change to log (:meth:`_commit`) for demand or a sleep request on an alias."""
        return self.k.intents_version, self.k.intents_log, alias

    def _routes_changed(self, alias: str) -> tuple[str, str, str]:
        """The change to log (:meth:`_commit`) for a write to an alias's routes."""
        return self.k.routes_version, self.k.routes_log, alias

    # ------------------------------------------------------------------ events (hints only)
    async def publish(self, kind: str, **fields: str) -> None:
        if self.events_enabled:
            await self.r.publish(self.k.events, orjson.dumps({"kind": kind, **fields}))

    async def _fenced(self, token: str, build: Callable[[Pipeline], None]) -> None:
        """Run ``build``'s commands atomically, only while ``token`` holds the lease."""
        async with self._txn(self.k.lease) as pipe:
            try:
                await pipe.watch(self.k.lease)
                if await pipe.get(self.k.lease) != token:
                    raise NotLeader(token)
                pipe.multi()
                build(pipe)
                await pipe.execute()
            except WatchError as e:
                raise NotLeader(token) from e

    async def listen(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Call ``on_event`` for each hint on the events channel, until cancelled.

        Hints are at-most-once (a reconnecting subscriber misses some); callers also poll.
        """
        if not self.events_enabled:
            return
        client = await self._subscriber()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.k.events)
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    try:
                        hint = orjson.loads(msg["data"])
                    except orjson.JSONDecodeError:
                        hint = {}  # not ours, but a hint all the same: look again
                    on_event(hint if isinstance(hint, dict) else {})
        finally:
            await pubsub.aclose()
            if client is not self.r:
                await client.aclose()

    async def _subscriber(self) -> aioredis.Redis:
        """The client to subscribe with. On a cluster, a plain connection to one of its
        primaries: a classic PUBLISH reaches every node of a cluster, so any node hears every
        hint (redis-py's cluster pub/sub picks a node by the channel's slot, and fails before
        the client has learnt the slots). Another node is picked at each resubscription."""
        if not self.cluster:
            return self.r
        cluster = cast(RedisCluster, self.r)
        await cluster.initialize()
        node = cluster.get_random_node()
        return aioredis.Redis(host=node.host, port=int(node.port), decode_responses=True,
                              **_TIMEOUTS)


def _shaped(op: str, reply: Any) -> Any:
    """A reply from inside the reads script in the shape redis-py gives that command's."""
    if isinstance(reply, Exception) or reply is None:
        return reply
    if op == "HGETALL":
        return dict(zip(reply[::2], reply[1::2], strict=True))
    if op == "SMEMBERS":
        return set(reply)
    return reply
