"""Every Redis key, channel and TTL-related name of the project, in one place.

Nothing else builds key strings: services ask :class:`Keys` (constructed with the configured
prefix) so that ``redis-cli --scan --pattern 'svllm:*'`` shows the whole pool.
docs/redis.md documents each key with the commands an operator uses to read it.
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

    # --- the pool ------------------------------------------------------------------------
    @property
    def pool_id(self) -> str:
        """string: this pool's id, created once (SET NX) by the first worker that asks. Names
        the pool in its engines' records, so pools sharing a machine never end each other's."""
        return f"{self.prefix}:pool:id"

    # --- workers -------------------------------------------------------------------------
    @property
    def workers(self) -> str:
        """set: every worker id that ever registered (dead ones stay, marked by no alive key)."""
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        """hash: url, engines, gpus, version, timestamps, reported load."""
        return f"{self.prefix}:worker:{worker_id}"

    def worker_alive(self, worker_id: str) -> str:
        """string with TTL: the heartbeat. Gone means the worker is dead."""
        return f"{self.prefix}:worker:{worker_id}:alive"

    # --- models (desired state, written by the admin API) ----------------------------------
    @property
    def models(self) -> str:
        """set: registered aliases."""
        return f"{self.prefix}:models"

    def model(self, alias: str) -> str:
        """hash: spec (JSON) plus readable copies of model_name and engine."""
        return f"{self.prefix}:model:{alias}"

    def hold(self, alias: str) -> str:
        """string: present when an operator stopped the alias by hand; the scheduler leaves it."""
        return f"{self.prefix}:hold:{alias}"

    def manual(self, alias: str) -> str:
        """hash: worker id -> request JSON: operators' manual placements of the alias, which
        the scheduler carries out (it alone writes assignments)."""
        return f"{self.prefix}:manual:{alias}"

    def intent(self, alias: str) -> str:
        """string with TTL: an operator's pending request for the alias ({"action": "sleep"}),
        applied and deleted by the scheduler."""
        return f"{self.prefix}:intent:{alias}"

    def placement(self, alias: str) -> str:
        """hash: the scheduler's last word on an alias it could not place (reason, at)."""
        return f"{self.prefix}:placement:{alias}"

    def demand(self, alias: str) -> str:
        """string with TTL: a request is waiting for the alias; the scheduler wakes/places it."""
        return f"{self.prefix}:demand:{alias}"

    def queue(self, alias: str) -> str:
        """sorted set: held requests of the alias across routers (member -> expiry time)."""
        return f"{self.prefix}:queue:{alias}"

    def stats(self, alias: str) -> str:
        """hash: counts and sums of cold starts, wakes and request waits."""
        return f"{self.prefix}:stats:{alias}"

    def samples(self, alias: str, kind: str) -> str:
        """list: the latest durations (seconds) of one kind ('cold_start', 'wake')."""
        return f"{self.prefix}:samples:{alias}:{kind}"

    # --- assignments (written by the scheduler alone, fenced) -----------------------------
    def assign(self, worker_id: str) -> str:
        """hash: alias -> assignment JSON (epoch, source, gpus)."""
        return f"{self.prefix}:assign:{worker_id}"

    def ledger(self, worker_id: str) -> str:
        """hash: alias -> reservation JSON (GPUs, MB per GPU). Written with the assignment;
        deleted by the worker only once the engine is confirmed gone."""
        return f"{self.prefix}:ledger:{worker_id}"

    @property
    def autoscale(self) -> str:
        """hash: alias -> the autoscaler's clocks (JSON), so a new leader keeps them."""
        return f"{self.prefix}:autoscale"

    # --- observed state (written by workers) ----------------------------------------------
    def instance(self, alias: str, worker_id: str) -> str:
        """hash: state, port, pid, engine, timestamps, error, log tail."""
        return f"{self.prefix}:instance:{alias}:{worker_id}"

    def instances(self, alias: str) -> str:
        """set: worker ids that hold an instance record of the alias (index for status)."""
        return f"{self.prefix}:instances:{alias}"

    def routes(self, alias: str) -> str:
        """hash: worker id -> worker base URL, for instances that serve now."""
        return f"{self.prefix}:routes:{alias}"

    def load(self, alias: str) -> str:
        """hash: worker id -> the engine's running + waiting requests (from its /metrics)."""
        return f"{self.prefix}:load:{alias}"

    # --- change counters: routers reload only what changed ---------------------------------
    @property
    def models_version(self) -> str:
        return f"{self.prefix}:version:models"

    @property
    def routes_version(self) -> str:
        return f"{self.prefix}:version:routes"

    @property
    def models_log(self) -> str:
        """stream, capped: one entry (field ``alias``) per bump of the models version, so a
        router re-reads only the models named since its last pass."""
        return f"{self.prefix}:log:models"

    @property
    def routes_log(self) -> str:
        """stream, capped: one entry (field ``alias``) per bump of the routes version, so a
        router re-reads only the aliases named since its last pass. Not ``routes:log``: that
        is the routes hash of an alias named "log"."""
        return f"{self.prefix}:log:routes"

    # --- scheduler leadership ------------------------------------------------------------
    @property
    def lease(self) -> str:
        """string with TTL: 'holder|epoch' of the manager that schedules now."""
        return f"{self.prefix}:scheduler:lease"

    @property
    def epoch(self) -> str:
        """integer: fencing epoch, incremented each time the lease changes hands."""
        return f"{self.prefix}:scheduler:epoch"

    # --- hints ---------------------------------------------------------------------------
    @property
    def events(self) -> str:
        """pub/sub channel: JSON hints ('look again'), never the record."""
        return f"{self.prefix}:events"

    # --- API keys, limits and usage (docs/keys.md). Everything of one tenant shares the
    # Redis Cluster hash tag {t:<tenant>}, so the limiter's one script touches one slot.
    def tenant_tag(self, tenant: str) -> str:
        return f"{self.prefix}:{{t:{tenant}}}"

    def api_keys(self, tenant: str) -> str:
        """hash: key id -> the key's record (JSON, the secret's SHA-256, never the secret)."""
        return f"{self.tenant_tag(tenant)}:apikeys"

    def tenant_limits(self, tenant: str) -> str:
        """hash: rpm, tpm of the whole tenant (absent: no tenant limit)."""
        return f"{self.tenant_tag(tenant)}:limits"

    def rate(self, tenant: str, scope: str, unit: str) -> str:
        """string with TTL: a GCRA bucket's theoretical arrival time (microseconds); scope is
        a key id or "tenant", unit "req" or "tok"."""
        return f"{self.tenant_tag(tenant)}:rate:{scope}:{unit}"

    def usage(self, tenant: str, hour: int) -> str:
        """hash with TTL (USAGE_TTL_S): "<key id>|<model>|<counter>" -> count, for the hour
        starting at ``hour`` (unix seconds)."""
        return f"{self.tenant_tag(tenant)}:usage:{hour}"

    @property
    def tenants(self) -> str:
        """set: tenants that have (had) keys or limits; where listings start."""
        return f"{self.prefix}:tenants"

    @property
    def key_index(self) -> str:
        """hash: key id -> its tenant (finds a key's record by id)."""
        return f"{self.prefix}:apikeys:index"

    @property
    def keys_version(self) -> str:
        """integer: bumped by every change of a key or tenant limit; routers reload on a move."""
        return f"{self.prefix}:version:keys"

    @property
    def routers(self) -> str:
        """sorted set: router id -> last check-in (unix seconds)."""
        return f"{self.prefix}:routers"
