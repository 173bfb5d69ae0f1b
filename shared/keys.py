"""Every Redis key, channel and TTL-related name of the project, in one place.

Nothing else builds key strings: services ask :class:`Keys` (constructed with the configured
prefix) so that ``redis-cli --scan --pattern 'svllm:*'`` shows the whole pool.
docs/redis.md documents each key with the commands an operator uses to read it.

Hash tags (Redis Cluster). Every key carries a hash tag, the part in braces, and Redis Cluster
puts keys with the same tag in the same hash slot. Every multi-key operation of the store
(MULTI/EXEC, WATCH, Lua, MGET) keeps its keys under one tag, so the pool runs unchanged on a
cluster while the keys of different models and workers still spread over its nodes:

- ``{m:<alias>}``: everything of one model (spec, hold, requests, instances, routes, queue,
  stats), e.g. ``svllm:{m:demo}:routes``;
- ``{w:<worker>}``: one worker's registration and heartbeat, e.g. ``svllm:{w:box1}:alive``;
- ``{s}``: the scheduler's and the pool's own keys: the lease and its epoch, the assignments
  and ledgers (the lease fences their writes, so they share its slot), the workers and models
  indexes, the change counters and their logs;
- ``{t:<tenant>}``: one tenant's keys (API keys and what belongs to them).

A new key takes the tag of the thing it belongs to; a key written in one transaction with
keys of another tag is a design question (docs/redis.md, "Redis Cluster", says how the
store splits such writes), not a key to add. The tag is always the first ``{...}`` of the
key, right after the prefix (the prefix has no braces: REDIS_PREFIX's pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "svllm"

# Usage counters (one hash per tenant and hour) are kept this long.
USAGE_TTL_S = 90 * 24 * 3600
# A router that has not checked in (keys version pass, every half second) this long is no
# longer counted when routers split a limit locally (max_concurrent, Redis down).
ROUTER_SEEN_TTL_S = 10.0


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    # --- hash tags (see the module's docstring) ----------------------------------------------
    @property
    def _s(self) -> str:
        return f"{self.prefix}:{{s}}"

    def _m(self, alias: str) -> str:
        return f"{self.prefix}:{{m:{alias}}}"

    def _w(self, worker_id: str) -> str:
        return f"{self.prefix}:{{w:{worker_id}}}"

    # --- the pool ------------------------------------------------------------------------
    @property
    def pool_id(self) -> str:
        """string: this pool's id, created once (SET NX) by the first worker that asks. Names
        the pool in its engines' records, so pools sharing a machine never end each other's."""
        return f"{self._s}:pool:id"

    # --- workers -------------------------------------------------------------------------
    @property
    def workers(self) -> str:
        """set: every worker id that ever registered (dead ones stay, marked by no alive key)."""
        return f"{self._s}:workers"

    def worker(self, worker_id: str) -> str:
        """hash: url, engines, gpus, version, timestamps, reported load."""
        return f"{self._w(worker_id)}:worker"

    def worker_alive(self, worker_id: str) -> str:
        """string with TTL: the heartbeat. Gone means the worker is dead."""
        return f"{self._w(worker_id)}:alive"

    # --- models (desired state, written by the admin API) ----------------------------------
    @property
    def models(self) -> str:
        """set: registered aliases."""
        return f"{self._s}:models"

    def model(self, alias: str) -> str:
        """hash: spec (JSON) plus readable copies of model_name and engine."""
        return f"{self._m(alias)}:model"

    def hold(self, alias: str) -> str:
        """string: present when an operator stopped the alias by hand; the scheduler leaves it."""
        return f"{self._m(alias)}:hold"

    def manual(self, alias: str) -> str:
        """hash: worker id -> request JSON: operators' manual placements of the alias, which
        the scheduler carries out (it alone writes assignments)."""
        return f"{self._m(alias)}:manual"

    def intent(self, alias: str) -> str:
        """string with TTL: an operator's pending request for the alias ({"action": "sleep"}),
        applied and deleted by the scheduler."""
        return f"{self._m(alias)}:intent"

    def placement(self, alias: str) -> str:
        """hash: the scheduler's last word on an alias it could not place (reason, at)."""
        return f"{self._m(alias)}:placement"

    def demand(self, alias: str) -> str:
        """string with TTL: a request is waiting for the alias; the scheduler wakes/places it."""
        return f"{self._m(alias)}:demand"

    def queue(self, alias: str) -> str:
        """sorted set: held requests of the alias across routers (member -> expiry time)."""
        return f"{self._m(alias)}:queue"

    def stats(self, alias: str) -> str:
        """hash: counts and sums of cold starts, wakes and request waits."""
        return f"{self._m(alias)}:stats"

    def samples(self, alias: str, kind: str) -> str:
        """list: the latest durations (seconds) of one kind ('cold_start', 'wake')."""
        return f"{self._m(alias)}:samples:{kind}"

    # --- assignments (written by the scheduler alone, fenced) -----------------------------
    def assign(self, worker_id: str) -> str:
        """hash: alias -> assignment JSON (epoch, source, gpus)."""
        return f"{self._s}:assign:{worker_id}"

    def ledger(self, worker_id: str) -> str:
        """hash: alias -> reservation JSON (GPUs, MB per GPU). Written with the assignment;
        deleted by the worker only once the engine is confirmed gone."""
        return f"{self._s}:ledger:{worker_id}"

    @property
    def assign_versions(self) -> str:
        """hash: worker id -> a count bumped by every write to that worker's assignments or
        ledger (in the same transaction): a worker re-reads its assignments, and the
        scheduler a worker's, only when it moved."""
        return f"{self._s}:assign:versions"

    @property
    def worker_revs(self) -> str:
        """hash: worker id -> a count bumped after every write to that worker's record (its
        registration, a heartbeat that reports something new, its engine flags): the
        scheduler reads again only the records whose count moved."""
        return f"{self._s}:worker:revs"

    @property
    def autoscale(self) -> str:
        """hash: alias -> the autoscaler's clocks (JSON), so a new leader keeps them."""
        return f"{self._s}:autoscale"

    # --- observed state (written by workers) ----------------------------------------------
    def instance(self, alias: str, worker_id: str) -> str:
        """hash: state, port, pid, engine, timestamps, error, log tail."""
        return f"{self._m(alias)}:instance:{worker_id}"

    def instances(self, alias: str) -> str:
        """set: worker ids that hold an instance record of the alias (index for status)."""
        return f"{self._m(alias)}:instances"

    def routes(self, alias: str) -> str:
        """hash: worker id -> worker base URL, for instances that serve now."""
        return f"{self._m(alias)}:routes"

    def load(self, alias: str) -> str:
        """hash: worker id -> the engine's running + waiting requests (from its /metrics)."""
        return f"{self._m(alias)}:load"

    # --- LoRA adapters ----------------------------------------------------------------------
    @property
    def adapters(self) -> str:
        """hash: adapter alias -> AdapterSpec JSON (written by the admin API)."""
        return f"{self._s}:adapters"

    def lora_loaded(self, base: str) -> str:
        """hash: worker id -> JSON list of the adapters its engine of ``base`` holds now
        (written by that worker on each load and eviction; routers prefer those replicas)."""
        return f"{self._m(base)}:lora"

    @property
    def adapter_stats(self) -> str:
        """hash: '<alias>:loads' / ':load_s' / ':evictions' -> counts and seconds of adapter
        loads, kept apart from the base model's cold starts."""
        return f"{self._s}:adapter_stats"

    # --- weights prefetch -------------------------------------------------------------------
    def prefetch(self, worker_id: str) -> str:
        """hash: alias -> JSON request (model_name, requested_at): weights the worker is asked
        to download ahead of time; the worker deletes the field when it is done or failed."""
        return f"{self._s}:prefetch:{worker_id}"

    def prefetch_status(self, alias: str) -> str:
        """hash: worker id -> JSON progress of the alias's prefetch there (state, done_mb,
        error, updated_at), shown in /admin/status."""
        return f"{self._m(alias)}:prefetch_status"

    # --- change counters: routers reload only what changed ---------------------------------
    @property
    def models_version(self) -> str:
        return f"{self._s}:version:models"

    @property
    def routes_version(self) -> str:
        return f"{self._s}:version:routes"

    @property
    def intents_version(self) -> str:
        return f"{self._s}:version:intents"

    @property
    def intents_log(self) -> str:
        """stream, capped: one entry (field ``alias``) per bump of the intents version: a
        request that waits (demand) or a sleep request, so the scheduler's tick finds them
        without reading every alias (and without their pub/sub hint)."""
        return f"{self._s}:log:intents"

    @property
    def models_log(self) -> str:
        """stream, capped: one entry (field ``alias``) per bump of the models version, so a
        router re-reads only the models named since its last pass."""
        return f"{self._s}:log:models"

    @property
    def routes_log(self) -> str:
        """stream, capped: one entry (field ``alias``) per bump of the routes version, so a
        router re-reads only the aliases named since its last pass."""
        return f"{self._s}:log:routes"

    # --- scheduler leadership ------------------------------------------------------------
    @property
    def lease(self) -> str:
        """string with TTL: 'holder|epoch' of the manager that schedules now."""
        return f"{self._s}:scheduler:lease"

    @property
    def epoch(self) -> str:
        """integer: fencing epoch, incremented each time the lease changes hands."""
        return f"{self._s}:scheduler:epoch"

    # --- hints ---------------------------------------------------------------------------
    @property
    def events(self) -> str:
        """pub/sub channel: JSON hints ('look again'), never the record."""
        return f"{self.prefix}:events"

    # --- API keys, limits and usage (docs/keys.md). Everything of one tenant shares the
    # Redis Cluster hash tag {t:<tenant>}, so the limiter's one script touches one slot.
    def _tag(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}"

    def api_keys(self, tenant: str) -> str:
        """hash: key id -> the key's record (JSON, the secret's SHA-256, never the secret)."""
        return f"{self._tag(tenant)}:apikeys"

    def tenant_limits(self, tenant: str) -> str:
        """hash: rpm, tpm of the whole tenant (absent: no tenant limit)."""
        return f"{self._tag(tenant)}:limits"

    def rate(self, tenant: str, scope: str, unit: str) -> str:
        """string with TTL: a GCRA bucket's theoretical arrival time (microseconds); scope is
        a key id or "tenant", unit "req" or "tok"."""
        return f"{self._tag(tenant)}:rate:{scope}:{unit}"

    def flushed(self, tenant: str, writer: str) -> str:
        """string with TTL (a day): the number of the last batch of token corrections and
        usage counts that router ``writer`` (a router process) applied to the tenant."""
        return f"{self._tag(tenant)}:flushed:{writer}"

    def usage(self, tenant: str, hour: int) -> str:
        """hash with TTL (USAGE_TTL_S): "<key id>|<model>|<counter>" -> count, for the hour
        starting at ``hour`` (unix seconds)."""
        return f"{self._tag(tenant)}:usage:{hour}"

    @property
    def tenants(self) -> str:
        """set: tenants that have (had) keys or limits; where listings start."""
        return f"{self._s}:tenants"

    @property
    def key_index(self) -> str:
        """hash: key id -> its tenant (finds a key's record by id)."""
        return f"{self._s}:apikeys:index"

    @property
    def keys_version(self) -> str:
        """integer: bumped by every change of a key or tenant limit; routers reload on a move."""
        return f"{self._s}:version:keys"

    @property
    def routers(self) -> str:
        """sorted set: router id -> last check-in (unix seconds)."""
        return f"{self._s}:routers"
