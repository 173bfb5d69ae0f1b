"""The scheduling loop: converge assignments toward the registered models.

Level-triggered at heart: a full pass reads the whole desired and observed state and fixes
differences, so lost pub/sub hints or a crashed manager cost only latency. Full passes run
when a manager becomes leader and then every RESYNC_S; between them each tick looks only at
what changed since the last one (:meth:`Scheduler.reconcile_changes`): the aliases named in
the models and routes logs and in hints, the workers that joined, died or whose assignments
someone else wrote (their assignment versions), and the aliases whose policy runs on timers.
Anything it cannot account for (a log that does not cover a counter's move, a lost
subscription, a failed tick) makes the next tick a full pass. Only the lease holder acts, and
each of its writes is fenced by the lease token (see :mod:`shared.store`). It alone writes
assignments: operators' requests (holds, manual placements, demand, sleep) are read each pass
and carried out here (see :mod:`shared.store.intents`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.manager.liveness import LivenessSchedule
from services.manager.metrics import ManagerMetrics, reason_kind
from services.manager.placement import Choice, WorkerOrder, choose_worker, fit_on
from services.manager.residency import Decision, ScaleState, Usage, autoscale, decide
from services.manager.worker_gc import gc_workers
from shared.events import Nudger
from shared.models import MANUAL_REFUSED, Assignment, Reservation, WorkerView
from shared.pace import pool_pace
from shared.settings import ManagerSettings
from shared.store import Intents, NotLeader, ScaleMark, Store, StoredModel
from shared.store.observed import RouteChanges
from shared.store.scheduling import ANY_WORKER, LogRead, SchedulerProbe, Unassign

logger = logging.getLogger(__name__)

# The most fenced writes held back to share one transaction.
WRITE_BATCH = 200
# The most log entries one incremental tick takes; beyond it a full pass is as cheap.
LOG_LIMIT = 2000
# Full passes take at most 1/RESYNC_SHARE of the leader's time: the next one is due
# RESYNC_S after the last, or this many times its duration when that is longer (a pass over
# 50,000 aliases takes seconds; every 30 s it would cost a fifth of a core for a safety net).
RESYNC_SHARE = 50
# Worker records (what heartbeats report: GPU memory, local weights) are read again before a
# tick that has something to converge when they are older than this.
VIEWS_MAX_AGE_S = 0.2


class FencedWrites:
    """The pass's assignment writes, sent in fenced transactions of up to ``limit``: a
    transaction per placement made a first pass over thousands of aliases cost thousands of
    round trips. Fencing is unchanged (a transaction lands only while the token holds the
    lease). The scheduler's other writes :meth:`flush` first, so Redis sees every write in
    the order it was decided; only the moment changes, by at most one batch.
    """

    def __init__(self, store: Store, token: str, limit: int = WRITE_BATCH) -> None:
        self.store = store
        self.token = token
        self.limit = limit
        self.pending: list[Assignment | Unassign] = []

    async def add(self, write: Assignment | Unassign) -> None:
        self.pending.append(write)
        if len(self.pending) >= self.limit:
            await self.flush()

    async def flush(self) -> None:
        writes, self.pending = self.pending, []
        await self.store.write_fenced(self.token, writes)


@dataclass
class LeaderState:
    epoch: int = 0
    passes: int = 0
    # Since when passes have reached Redis without failing (monotonic clock).
    store_ok_since: float = 0.0

    @property
    def leader(self) -> bool:
        return self.epoch > 0


def _timed_policy(model: StoredModel) -> bool:
    """Whether the model's policy acts on time passing (no change announces it)."""
    spec = model.spec
    return (spec.idle_stop_s is not None or spec.idle_sleep_s is not None
            or spec.target_inflight is not None)


@dataclass(frozen=True)
class _AliasPass:
    """What one pass knows of one alias."""

    model: StoredModel
    assigned: dict[str, Assignment]
    records: dict[str, dict[str, str]]
    demand: bool
    sleep: str | None


@dataclass
class _World:
    """What the last pass knew, kept so that the next tick reads only what changed. The
    scheduler alone writes assignments, so its own copies stay true; others' writes to a
    worker's ledger (a released reservation) or assignments (a deleted model) move that
    worker's assignment version and are read again."""

    views: dict[str, WorkerView]
    assigns: dict[str, dict[str, Assignment]]
    ledgers: dict[str, dict[str, Reservation]]
    aliases: set[str]
    """Registered aliases (a dead worker's cleanup drops its routes of each)."""
    versions: dict[str, str]
    """Assignment versions, read before the data they cover."""
    mark: RouteChanges
    """The counters and logs' newest ids, read before the data they cover."""
    intents: LogRead
    """The same for the intents log (demand, sleep requests)."""
    watch: set[str]
    """Aliases looked at on every tick: policies on timers (idle sleep or stop,
    autoscaling), waiting demand, a pending sleep request."""
    skipped: set[str] = field(default_factory=set)
    """Listed workers whose record does not parse (left out, as by a full pass)."""
    listed: int = 0
    """Entries of the workers index when the views were read."""
    revs: dict[str, str] = field(default_factory=dict)
    """Each worker record's write count (``worker:revs``), read before the views."""

    def __post_init__(self) -> None:
        self.views_at = time.monotonic()
        self.ids = sorted(self.views)
        self.alive = sum(1 for v in self.views.values() if v.alive)


def _accounts(before: str, after: str, listed: list[str] | None, unlogged: int = 0) -> bool:
    """True when the log entries listed (and ``unlogged`` bumps this manager made itself)
    explain a counter's move exactly (the routers' rule)."""
    try:
        moved = int(after) - int(before)
    except ValueError:
        return False
    return (listed is not None and moved == len(listed) + unlogged
            and len(listed) <= LOG_LIMIT)


class Scheduler:
    def __init__(self, store: Store, settings: ManagerSettings, nudger: Nudger,
                 metrics: ManagerMetrics | None = None) -> None:
        self.metrics = metrics
        self.store = store
        self.settings = settings
        self.nudger = nudger
        self.state = LeaderState()
        # alias -> (model version, reason) last written: a reason is written only when it
        # changes. Keyed by version, since deleting and registering the alias again removes
        # the reason from Redis (a cache by alias alone then never wrote it back, and the
        # held requests waited out their timeout instead of failing at once).
        self._reasons: dict[str, tuple[str, str]] = {}
        # The autoscaler's clocks, loaded from Redis each pass and saved when they change,
        # so a new leader (or this one after losing the lease) carries on from them.
        self._scale: dict[str, ScaleMark] = {}
        # The incremental control plane: what the last pass knew (None: the next is full),
        # when the next full pass is due, and the aliases hints named since the last tick.
        self._world: _World | None = None
        self._resync_at = 0.0
        self._hinted: set[str] = set()
        # Unlogged bumps of the routes counter this manager made since the last mark (a dead
        # worker's cleanup): the next tick counts them with the log, not as unexplained.
        self._unlogged = 0
        # Dead workers forgotten by a tick for their assigned aliases only: the next full
        # pass drops their routes and records of every other alias too.
        self._forget_later: set[str] = set()
        # The highest pace of late and when it was last the pace (see _pace).
        self._pace_high = (1.0, 0.0)
        # When each heartbeat key is checked next, and when every key is checked at once.
        self._live = LivenessSchedule(settings.heartbeat_ttl_s)
        self._sweep_at = 0.0
        nudger.on_hint(self._on_hint)
        # Passes of each kind (tests and the benchmark tell them apart).
        self.full_passes = 0
        self.change_passes = 0

    def _on_hint(self, hint: dict[str, object]) -> None:
        alias = hint.get("alias")
        if isinstance(alias, str):
            self._hinted.add(alias)
        elif hint.get("kind") == "resubscribed":
            self._world = None  # hints were lost: look at everything
        elif hint.get("kind") == "worker" and isinstance(hint.get("worker"), str):
            # A worker registered or left: its heartbeat key is checked at the next tick.
            self._live.soon(str(hint["worker"]), time.monotonic())

    @property
    def token(self) -> str:
        return f"{self.settings.manager_id}|{self.state.epoch}"

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except NotLeader:
                logger.warning("lost the scheduler lease mid-pass (epoch %s)", self.state.epoch)
                self.state.epoch = 0
            except (RedisConnectionError, RedisTimeoutError) as e:
                logger.warning("scheduler pass failed, Redis unreachable: %s", e)
                self.state.store_ok_since = time.monotonic()
            except RedisError as e:
                # Redis answered (a refused command): liveness stays trusted, so dead workers'
                # models are still re-placed while this is looked into.
                logger.warning("scheduler pass failed, Redis refused a command: %s", e)
            except Exception:  # a failed pass is retried on the next tick
                logger.exception("scheduler pass failed")
            await self.nudger.wait(self.settings.schedule_interval_s)

    async def tick(self) -> None:
        epoch = await self.store.acquire_lease(self.settings.manager_id, self.settings.lease_ttl_s)
        if epoch != self.state.epoch:
            logger.info("scheduler lease: %s", f"leader at epoch {epoch}" if epoch else "standby")
            self.state.epoch = epoch
            self._world = None  # another leader may have written meanwhile
        if epoch:
            began = time.monotonic()
            try:
                if self._world is None or began >= self._resync_at:
                    await self.reconcile()
                else:
                    await self.reconcile_changes()
            except BaseException:
                self._world = None  # what it holds may be half updated
                raise
            self.state.passes += 1
            if self.metrics is not None:
                self.metrics.pass_duration.observe(time.monotonic() - began)

    async def release(self) -> None:
        if self.state.leader:
            await self.store.release_lease(self.token)
            self.state.epoch = 0

    async def reconcile(self) -> None:
        """A full pass over every worker and alias."""
        # Where the logs and versions stand, read before the data: what lands after is
        # looked at again by the next tick.
        began = time.monotonic()
        mark = await self.store.route_changes(None, 0)
        intents_mark = await self.store.intent_changes(None, 0)
        self._unlogged = 0
        versions = await self.store.assign_versions()
        self._hinted.clear()
        revs = await self.store.worker_revs()
        members = await self.store.worker_ids()
        workers = await self.store.list_workers()
        self._count_workers(workers)
        listed, unreadable = await self.store.list_models_checked()
        models = {m.spec.alias: m for m in listed}
        self._reasons = {a: r for a, r in self._reasons.items() if a in models}
        marks = await self.store.scale_marks()
        self._scale = {a: m for a, m in marks.items()
                       if a in models and m.version == models[a].version}
        assigns = await self.store.assignments(w.worker_id for w in workers)
        ledgers = await self.store.ledgers(w.worker_id for w in workers)
        # Right after Redis comes back, heartbeat keys may have expired while workers could
        # not reach it: wait one TTL for them to beat again before calling anyone dead.
        since_ok = time.monotonic() - self.state.store_ok_since
        pace = self._pace(len(workers))
        trust_liveness = since_ok >= self.settings.heartbeat_ttl_s * pace
        later, self._forget_later = self._forget_later, set()
        for w in workers:
            if not w.alive and (assigns[w.worker_id] or w.worker_id in later) and trust_liveness:
                # A worker a tick already forgot (its assigned aliases) is not announced dead
                # again: only what it left under the other aliases goes now.
                await self._forget(w, list(models), again=not assigns[w.worker_id])
                assigns[w.worker_id] = {}
        workers = await gc_workers(self.store, self.token, workers, self.settings,
                                   trust_liveness, pace)
        for w in workers:
            for alias in list(assigns[w.worker_id]):
                # A model whose record does not parse is left as it is (reported), not
                # taken for deleted: a corrupt record must not stop what serves.
                if alias not in models and alias not in unreadable:
                    await self.store.unassign(self.token, w.worker_id, alias)
                    del assigns[w.worker_id][alias]
        views = {w.worker_id: w for w in workers}
        found = self._live.reset(await self.store.heartbeat_ttls(list(views)), time.monotonic())
        for wid, alive in found.items():
            if alive != views[wid].alive:  # changed since the records were read: the next
                self._live.soon(wid, time.monotonic())  # tick checks it again and flips it
        self._sweep_at = time.monotonic() + self.settings.liveness_sweep_s * pace
        watch = await self._converge(models, views, assigns, ledgers)
        await self._save_scale(marks)
        self._world = _World(views=views, assigns=assigns, ledgers=ledgers,
                             aliases=set(models) | unreadable, versions=versions, mark=mark,
                             intents=intents_mark, watch=watch, skipped=set(members) - set(views),
                             listed=len(members), revs=revs)
        took = time.monotonic() - began
        self._resync_at = time.monotonic() + max(self.settings.resync_s, RESYNC_SHARE * took)
        self.full_passes += 1

    async def reconcile_changes(self) -> None:
        """A tick between full passes: only what changed since the last one."""
        world = self._world
        assert world is not None
        mark = await self.store.route_changes(world.mark.last_id, LOG_LIMIT,
                                              world.mark.models_last_id)
        unlogged, self._unlogged = self._unlogged, 0
        intents = await self.store.intent_changes(world.intents.last_id, LOG_LIMIT)
        now = time.monotonic()
        pace = self._pace(len(world.ids))
        sweep = now >= self._sweep_at
        probe = await self.store.scheduler_probe(world.ids if sweep else [])
        (m0, r0), (m1, r1) = world.mark.versions, mark.versions
        if not (_accounts(m0, m1, mark.models)
                and _accounts(r0, r1, mark.aliases, unlogged)
                and _accounts(world.intents.version, intents.version, intents.aliases)):
            await self.reconcile()  # the logs do not cover what changed
            return
        hinted, self._hinted = self._hinted, set()
        dirty = (set(mark.models or ()) | set(mark.aliases or ()) | set(intents.aliases or ())
                 | hinted | world.watch)
        views, assigns, ledgers = world.views, world.assigns, world.ledgers
        due = self._live.due(now)
        # Each next check counts from after the read (a TTL is at most that old): counted
        # from before it, a check came a few ms early and cost one more tick.
        found = self._live.checked(await self.store.heartbeat_ttls(due),
                                   time.monotonic()) if due else {}
        views, revs, views_at, workers_changed = await self._views(
            world, probe, sweep, found, bool(mark.models), bool(dirty or self._reasons))
        if sweep:
            self._sweep_at = now + self.settings.liveness_sweep_s * pace
        versions = world.versions
        if probe.any_version != versions.get(ANY_WORKER, "0"):
            versions = await self.store.assign_versions()
        moved = _moved(world, views, assigns, versions)
        if moved:
            dirty |= await self._reread(moved, assigns, ledgers)
            workers_changed = True
        since_ok = time.monotonic() - self.state.store_ok_since
        some_dead = workers_changed or world.alive < len(world.ids)
        if some_dead and since_ok >= self.settings.heartbeat_ttl_s * pace:
            views = await self._confirm_dead(views, assigns)
            for w, view in views.items():
                if not view.alive and assigns.get(w):
                    # Its assigned aliases now (what must move at once); the rest at the
                    # next full pass (routers skip a dead worker's routes meanwhile).
                    await self._forget(view, sorted(assigns[w]))
                    self._forget_later.add(w)
                    dirty |= set(assigns[w])
                    assigns[w] = {}
            views = await self._collect(world, views)
        if workers_changed:
            self._count_workers(list(views.values()))
            dirty |= set(self._reasons)  # room may have appeared for what could not be placed
        if dirty:
            world.watch = await self._converge_dirty(world, dirty, views, assigns, ledgers)
        if views is not world.views:
            world = _World(views=views, assigns=assigns, ledgers=ledgers, aliases=world.aliases,
                           versions=versions, mark=mark, intents=intents, watch=world.watch,
                           skipped=world.skipped, listed=world.listed, revs=revs)
        # When the records were last read or checked (flipped liveness flags are not that).
        world.views_at, world.revs = views_at, revs
        world.versions, world.mark, world.intents = versions, mark, intents
        self._world = world
        self.change_passes += 1

    async def _reread(self, moved: list[str], assigns: dict[str, dict[str, Assignment]],
                      ledgers: dict[str, dict[str, Reservation]]) -> set[str]:
        """Read again the assignments and ledgers of workers someone wrote (or new ones);
        the aliases whose assignment there changed."""
        fresh, fresh_ledgers = await self.store.assignments(moved), await self.store.ledgers(moved)
        changed: set[str] = set()
        for w in moved:
            before = assigns.get(w, {})
            changed |= {a for a in set(before) | set(fresh[w]) if before.get(a) != fresh[w].get(a)}
            assigns[w], ledgers[w] = fresh[w], fresh_ledgers[w]
        return changed

    async def _views(self, world: _World, probe: SchedulerProbe, sweep: bool,
                     found: dict[str, bool], registered: bool, placing: bool,
                     ) -> tuple[dict[str, WorkerView], dict[str, str], float, bool]:
        """The worker views a tick works on, their records' counts, when the records were
        last read or checked (flipped liveness flags are not that), and whether any view
        differs from ``world``'s. ``found``: the liveness of the heartbeat keys due for a
        check; ``sweep``: ``probe`` counted every key."""
        views, revs, views_at, changed = world.views, world.revs, world.views_at, False
        # A registration or spec change is placed on records read after it landed: a record
        # up to VIEWS_MAX_AGE_S old could predate what a client saw before registering (a
        # worker's newly cached weights) and place the model elsewhere for good. Registrations
        # are rare; the other changes (demand, deaths, timers) accept the bounded age.
        stale = time.monotonic() - world.views_at >= VIEWS_MAX_AGE_S or registered
        if probe.workers != world.listed:
            # A worker joined or left (rare): every view read again.
            views_at = time.monotonic()
            revs = await self.store.worker_revs()
            members = await self.store.worker_ids()
            views = {w.worker_id: w for w in await self.store.list_workers()}
            world.skipped, world.listed = set(members) - set(views), len(members)
            self._live.sync(views, views_at)
            return views, revs, views_at, True  # liveness flags read with the records
        if stale and placing:
            # Placements may be made on records (GPU memory, local weights) older than
            # VIEWS_MAX_AGE_S: those written since they were read are read again (their
            # count in worker:revs moved; re-reading all 5,000 took ~200 ms).
            views_at = time.monotonic()
            revs = await self.store.worker_revs()
            views = await self._fresh_views(world, views, revs)
            changed = views is not world.views
        flips = {w: a for w, a in found.items() if w in views and views[w].alive != a}
        if sweep:
            alive_now = (world.alive if views is world.views
                         else sum(v.alive for v in views.values()))
            alive_now += sum(1 if a else -1 for a in flips.values())
            if probe.alive != alive_now:
                # A key went (or came) outside its schedule: the flags are read (one MGET),
                # and those that differ are checked again at the next tick.
                alive = await self.store.alive(list(views))
                now = time.monotonic()
                for w, v in views.items():
                    if flips.get(w, v.alive) != (w in alive):
                        flips[w] = w in alive
                        self._live.soon(w, now)
        flips = {w: a for w, a in flips.items() if views[w].alive != a}
        if flips:
            # A worker died or came back: its view is flipped, its record not read again.
            views, changed = self._with_flips(views, flips), True
        return views, revs, views_at, changed

    def _with_flips(self, views: dict[str, WorkerView], flips: dict[str, bool]
                    ) -> dict[str, WorkerView]:
        """``views`` with the liveness of the workers in ``flips`` set (``views`` itself when
        there are none)."""
        if not flips:
            return views
        return {w: self._flipped(v, flips[w]) if w in flips else v for w, v in views.items()}

    async def _confirm_dead(self, views: dict[str, WorkerView],
                            assigns: dict[str, dict[str, Assignment]]) -> dict[str, WorkerView]:
        """Dead workers that still hold assignments, checked again before those are taken
        away: a flag can be up to DEAD_RECHECK_S old (a worker that beat again after Redis
        came back must keep its models)."""
        doomed = [w for w, v in views.items() if not v.alive and assigns.get(w)]
        if not doomed:
            return views
        found = self._live.checked(await self.store.heartbeat_ttls(doomed), time.monotonic())
        back = {w for w in doomed if found.get(w)}
        return self._with_flips(views, dict.fromkeys(back, True))

    async def _fresh_views(self, world: _World, views: dict[str, WorkerView],
                           revs: dict[str, str]) -> dict[str, WorkerView]:
        """``views`` with the records whose ``worker:revs`` count moved since ``world`` read
        them read again (``views`` itself when none did)."""
        moved = [w for w in views if revs.get(w) != world.revs.get(w)]
        if not moved:
            return views
        fresh = {v.worker_id: v for v in await self.store.workers_by_id(moved)}
        out = dict(views)
        for w in moved:
            if w in fresh:
                out[w] = fresh[w]
            else:  # its record no longer parses: left out, as a full pass leaves it
                del out[w]
                world.skipped.add(w)
        return out

    @property
    def heartbeat_pace(self) -> float:
        """The pace of the last pass or tick (shared/pace.py): what the scheduler's waits
        are stretched by; also in /health."""
        return self._pace_high[0]

    def _pace(self, workers: int) -> float:
        """The pace for a pool of ``workers``, once per pass or tick: workers stretch their
        interval and TTL past a size (shared/pace.py); so do the wait for them after a Redis
        outage, the collection grace and the sweep of every heartbeat key (its cost, like
        the beats', then stays flat).

        Workers learn a new pace at their full beats, up to ``RESYNC_S x`` their pace
        later: after the pool shrinks, some still beat at the higher pace for that long, so
        the highest pace of that window is used (a wait too long delays a verdict; one too
        short would call a slow-beating worker dead)."""
        s = self.settings
        pace = pool_pace(workers, s)
        high, seen = self._pace_high
        now = time.monotonic()
        if pace >= high or now - seen > (s.resync_s + s.heartbeat_ttl_s) * high:
            self._pace_high = (pace, now)
            high = pace
        return high

    def _flipped(self, view: WorkerView, alive: bool) -> WorkerView:
        """A cached view whose heartbeat key appeared or went. A worker just found dead beat
        at least one TTL ago at the latest (its key expired within a tick): the grace period
        of its collection counts from then, not from a record read long before."""
        ttl = self.settings.heartbeat_ttl_s * self.heartbeat_pace
        seen = view.last_seen if alive else max(view.last_seen, time.time() - ttl)
        return view.model_copy(update={"alive": alive, "last_seen": seen})

    async def _collect(self, world: _World, views: dict[str, WorkerView]
                       ) -> dict[str, WorkerView]:
        """Dead workers past WORKER_GC_GRACE_S collected between full passes too."""
        dead = [v for v in views.values() if not v.alive]
        kept = await gc_workers(self.store, self.token, dead, self.settings, True,
                                self.heartbeat_pace)
        if len(kept) == len(dead):
            return views
        gone = {v.worker_id for v in dead} - {v.worker_id for v in kept}
        for w in gone:
            world.assigns.pop(w, None)
            world.ledgers.pop(w, None)
        world.listed -= len(gone)
        return {w: v for w, v in views.items() if w not in gone}

    async def _converge_dirty(
        self, world: _World, dirty: set[str], views: dict[str, WorkerView],
        assigns: dict[str, dict[str, Assignment]], ledgers: dict[str, dict[str, Reservation]],
    ) -> set[str]:
        """Converge the aliases of ``dirty`` (their models read again; those gone
        unassigned); returns the new watch set."""
        found, unreadable = await self.store.get_models_checked(sorted(dirty))
        deleted = dirty - set(found) - unreadable
        if deleted:
            for w, mine in assigns.items():
                for alias in [a for a in mine if a in deleted]:
                    await self.store.unassign(self.token, w, alias)
                    del mine[alias]
        saved = dict(self._scale)
        for alias in deleted:
            self._reasons.pop(alias, None)
            if self._scale.pop(alias, None) is None:
                saved.pop(alias, None)
        watch = world.watch - dirty
        if found:
            watch |= await self._converge(found, views, assigns, ledgers)
        await self._save_scale(saved)
        world.aliases -= deleted
        world.aliases |= set(found) | unreadable
        return watch

    async def _converge(
        self, models: dict[str, StoredModel], views: dict[str, WorkerView],
        assigns: dict[str, dict[str, Assignment]], ledgers: dict[str, dict[str, Reservation]],
    ) -> set[str]:
        """Converge the assignments of ``models`` (every worker's ``assigns`` and ``ledgers``
        kept in step with what is written). Returns the aliases among them to look at again
        on every tick (:attr:`_World.watch`)."""
        workers = list(views.values())
        aliases = list(models)
        demands = await self.store.demands(aliases)
        intents = await self.store.intents(aliases)
        usage = await self.store.instances_by_alias(aliases)
        # alias -> worker -> assignment, built once: scanning every worker for every alias
        # made a pass grow with workers x aliases.
        by_alias: dict[str, dict[str, Assignment]] = {}
        for wid, mine in assigns.items():
            for alias, a in mine.items():
                by_alias.setdefault(alias, {})[wid] = a
        now = time.time()
        renewed = time.monotonic()
        # Workers least loaded first, kept in step with every change below: a placement
        # stops at the first worker that fits instead of scanning them all.
        for w in views:
            assigns.setdefault(w, {})
        order = WorkerOrder(workers, assigns, ledgers)
        writes = FencedWrites(self.store, self.token)
        watch = {a for a, m in models.items() if _timed_policy(m) or a in demands
                 or (a in intents and intents[a].sleep is not None)}
        try:
            for alias, model in models.items():
                if time.monotonic() - renewed > self.settings.lease_ttl_s / 3:
                    await writes.flush()
                    await self._renew_lease()  # a long pass must not outlive the lease
                    renewed = time.monotonic()
                assigned = by_alias.setdefault(alias, {})
                wants = intents.get(alias, Intents())
                await self._apply_manual(model, wants.manual, views, assigns, ledgers, assigned,
                                         order, writes)
                if model.hold is not None:
                    # Stopped by an operator: none of the scheduler's own replicas stays.
                    await self._unassign_own(alias, assigns, assigned, order, writes)
                else:
                    ctx = _AliasPass(model, assigned, usage[alias], alias in demands, wants.sleep)
                    await self._schedule(ctx, workers, assigns, ledgers, order, writes, now)
        except (NotLeader, RedisError):
            raise  # the held-back writes could not land either
        except Exception:
            await writes.flush()  # what was decided before the failure lands, as it did unbatched
            raise
        await writes.flush()
        return watch

    def _count_workers(self, workers: list[WorkerView]) -> None:
        if self.metrics is not None:
            self.metrics.workers_registered.set(len(workers))
            self.metrics.workers_alive.set(sum(1 for w in workers if w.alive))

    async def _save_scale(self, loaded: dict[str, ScaleMark]) -> None:
        changed = {a: m for a, m in self._scale.items() if loaded.get(a) != m}
        gone = [a for a in loaded if a not in self._scale]
        await self.store.save_scale_marks(self.token, changed, gone)

    async def _schedule(
        self, ctx: _AliasPass, workers: list[WorkerView],
        assigns: dict[str, dict[str, Assignment]], ledgers: dict[str, dict[str, Reservation]],
        order: WorkerOrder, writes: FencedWrites, now: float,
    ) -> None:
        """Residency, autoscaling, an operator's sleep request and placement of one alias
        that is not held."""
        model, assigned, alias = ctx.model, ctx.assigned, ctx.model.spec.alias
        observed = {w: Usage.from_record(r) for w, r in ctx.records.items()}
        demand = ctx.demand
        if demand and any(u.state == "RUNNING" for u in observed.values()):
            # Served: the waiting requests go through; the idle clock may run again.
            await writes.flush()
            await self.store.clear_demand(alias)
            demand = False
        decision = decide(model.spec, assigned, observed, demand, now)
        decision.desired = self._autoscaled(model, decision, assigned, observed, now)
        if ctx.sleep is not None:
            decision.targets = {w: "sleeping" for w, a in assigned.items()
                                if a.target != "sleeping"}
            decision.reason = "an operator asked"
        await self._apply_residency(alias, decision, assigns, assigned, order, writes)
        await self._converge_model(model, decision.desired, workers, assigns, ledgers,
                                   assigned, order, writes)
        if ctx.sleep is not None:
            await writes.flush()
            await self.store.clear_intent(alias, ctx.sleep)

    async def _renew_lease(self) -> None:
        epoch = await self.store.acquire_lease(self.settings.manager_id, self.settings.lease_ttl_s)
        if epoch != self.state.epoch:
            raise NotLeader(self.token)

    async def _forget(self, w: WorkerView, aliases: list[str], again: bool = False) -> None:
        if again:
            logger.info("dropping what dead worker %s left under every alias", w.worker_id)
        else:
            logger.warning("worker %s is dead (heartbeat expired); re-placing its models",
                           w.worker_id)
        self._unlogged += 1  # counted before the write: one that fails ends the tick anyway
        await self.store.forget_dead_worker(self.token, w.worker_id, aliases)

    def _autoscaled(
        self, model: StoredModel, decision: Decision, assigned: dict[str, Assignment],
        observed: dict[str, Usage], now: float,
    ) -> int:
        spec = model.spec
        own = sum(1 for a in assigned.values() if a.source == "scheduler")
        if spec.target_inflight is None or decision.desired == 0 or decision.stop_all:
            return decision.desired
        mark = self._scale.get(spec.alias)
        state = ScaleState(mark.above_since, mark.below_since) if mark else ScaleState()
        inflight = sum(u.inflight for u in observed.values())
        settings = self.settings
        want = autoscale(spec, own, inflight, state, now, settings.scale_out_s,
                         settings.scale_in_s)
        self._scale[spec.alias] = ScaleMark(version=model.version, above_since=state.above_since,
                                            below_since=state.below_since)
        if want != own:
            if self.metrics is not None:
                self.metrics.autoscale.labels(spec.alias, "out" if want > own else "in").inc()
            logger.info("autoscaling %s: %d -> %d replicas (%d requests in flight, target %g "
                        "per replica)", spec.alias, own, want, inflight, spec.target_inflight)
        return want

    async def _apply_residency(
        self, alias: str, decision: Decision, assigns: dict[str, dict[str, Assignment]],
        assigned: dict[str, Assignment], order: WorkerOrder, writes: FencedWrites,
    ) -> None:
        """Carry out a residency decision; ``assigns``, this alias's ``assigned`` view and
        the worker ``order`` are kept in step with what is written."""
        if decision.stop_all:
            await self._unassign_own(alias, assigns, assigned, order, writes)
            logger.info("stopped %s: %s", alias, decision.reason)
        for w, target in decision.targets.items():
            updated = assigned[w].model_copy(update={"target": target})
            await writes.add(updated)
            assigns[w][alias] = assigned[w] = updated
        if decision.targets:
            logger.info("%s -> %s on %s (%s)", alias, ", ".join(set(decision.targets.values())),
                        ", ".join(decision.targets), decision.reason)

    async def _unassign_own(
        self, alias: str, assigns: dict[str, dict[str, Assignment]],
        assigned: dict[str, Assignment], order: WorkerOrder, writes: FencedWrites,
    ) -> None:
        """Remove the scheduler's own assignments of ``alias`` (manual ones stay)."""
        for w, a in list(assigned.items()):
            if a.source == "scheduler":
                await writes.add(Unassign(w, alias))
                del assigns[w][alias], assigned[w]
                order.touch(w)

    async def _apply_manual(
        self, model: StoredModel, manual: frozenset[str], views: dict[str, WorkerView],
        assigns: dict[str, dict[str, Assignment]], ledgers: dict[str, dict[str, Reservation]],
        assigned: dict[str, Assignment], order: WorkerOrder, writes: FencedWrites,
    ) -> None:
        """Make the manual assignments of ``model`` those operators asked for (``manual``:
        worker ids), each with its GPU reservation in the ledger like any placement."""
        alias = model.spec.alias
        for w, a in list(assigned.items()):
            if a.source == "manual" and w not in manual:
                await writes.add(Unassign(w, alias))
                del assigns[w][alias], assigned[w]
                order.touch(w)
        for w in sorted(manual):
            current = assigned.get(w)
            if current is not None:
                if current.source != "manual":  # the scheduler's replica becomes the operator's
                    updated = current.model_copy(update={"source": "manual"})
                    await writes.add(updated)
                    assigns[w][alias] = assigned[w] = updated
                continue
            view = views.get(w)
            fit = (fit_on(model.spec, view, ledgers.get(w, {}), assigns.get(w, {})) if view
                   else f"{w}: unknown")
            if isinstance(fit, str):
                await self._note_unplaced(model, f"{MANUAL_REFUSED}: {fit}", writes)
                continue
            a = Assignment(alias=alias, worker_id=w, epoch=self.state.epoch, source="manual",
                           gpus=fit.gpus, mb_per_gpu=fit.mb_per_gpu,
                           gpu_memory_utilization=fit.utilization, spec_version=model.version)
            await writes.add(a)
            assigns.setdefault(w, {})[alias] = assigned[w] = a
            if a.gpus:
                ledgers.setdefault(w, {})[alias] = Reservation(
                    alias=alias, gpus=a.gpus, mb_per_gpu=a.mb_per_gpu, epoch=a.epoch)
            order.touch(w)
            self._reasons.pop(alias, None)
            if self.metrics is not None:
                self.metrics.placements.labels(alias, "manual").inc()
            logger.info("placed %s on %s by an operator's request (gpus %s, %d MB each)",
                        alias, w, a.gpus, a.mb_per_gpu)

    async def _converge_model(
        self,
        model: StoredModel,
        desired: int,
        workers: list[WorkerView],
        assigns: dict[str, dict[str, Assignment]],
        ledgers: dict[str, dict[str, Reservation]],
        assigned: dict[str, Assignment],
        order: WorkerOrder,
        writes: FencedWrites,
    ) -> None:
        spec = model.spec
        # An operator's manual placements are extra to `replicas` and never undone: the
        # scheduler counts, adds and removes only its own.
        holders = [w for w, a in assigned.items() if a.source == "scheduler"]
        for _ in range(desired - len(holders)):
            choice = choose_worker(spec, workers, assigns, ledgers, order)
            if not isinstance(choice, Choice):
                await self._note_unplaced(model, choice.text(), writes)
                return
            a = Assignment(
                alias=spec.alias,
                worker_id=choice.worker_id,
                epoch=self.state.epoch,
                gpus=choice.gpus,
                mb_per_gpu=choice.mb_per_gpu,
                gpu_memory_utilization=choice.utilization,
                spec_version=model.version,
            )
            await writes.add(a)
            assigns[choice.worker_id][spec.alias] = assigned[choice.worker_id] = a
            if a.gpus:
                ledgers.setdefault(choice.worker_id, {})[spec.alias] = Reservation(
                    alias=spec.alias, gpus=a.gpus, mb_per_gpu=a.mb_per_gpu, epoch=a.epoch)
            order.touch(choice.worker_id)
            if self.metrics is not None:
                self.metrics.placements.labels(spec.alias, "scheduler").inc()
            self._reasons.pop(spec.alias, None)  # placing it deleted the reason
            logger.info("placed %s on %s (gpus %s, %d MB each, utilization %s)", spec.alias,
                        choice.worker_id, choice.gpus, choice.mb_per_gpu, choice.utilization)
        for w in sorted(holders, reverse=True)[: max(0, len(holders) - desired)]:
            await writes.add(Unassign(w, spec.alias))
            del assigns[w][spec.alias], assigned[w]
            order.touch(w)

    async def _note_unplaced(self, model: StoredModel, reason: str, writes: FencedWrites
                             ) -> None:
        alias = model.spec.alias
        if self._reasons.get(alias) != (model.version, reason):
            logger.warning("cannot place %s: %s", alias, reason)
            if self.metrics is not None:
                self.metrics.placement_failures.labels(alias, reason_kind(reason)).inc()
            await writes.flush()  # an earlier placement of the alias clears the reason
            await self.store.set_placement_reason(alias, reason)
            self._reasons[alias] = (model.version, reason)


def _moved(world: _World, views: dict[str, WorkerView],
           assigns: dict[str, dict[str, Assignment]],
           versions: dict[str, str]) -> list[str]:
    """The workers whose assignments must be read again: new ones, and those whose
    ``assign:versions`` entry moved since ``world`` was read."""
    if versions is world.versions and views is world.views:
        # No version moved and no worker joined: every view's state was read by an earlier
        # pass (a walk over 5,000 workers every tick cost ~3 ms for nothing).
        return []
    return [w for w in views if w not in assigns or versions.get(w) != world.versions.get(w)]
