"""The only package that talks to Redis: one :class:`Store` made of a part per concern."""

from __future__ import annotations

from shared.store.adapters import AdaptersStore
from shared.store.admin import AdminReads, ModelDetails
from shared.store.apikeys import FLUSH_BATCH_MAX, ApiKeysStore, Decision, FlushBatch
from shared.store.autoscale import AutoscaleStore, ScaleMark
from shared.store.base import NotLeader, StoredModel, connect, spec_fingerprint
from shared.store.intents import Intents, IntentsStore
from shared.store.lifecycle import LifecycleStore
from shared.store.models import ModelsStore
from shared.store.observed import ObservedStore
from shared.store.prefetch import PrefetchStore
from shared.store.scheduling import SchedulingStore
from shared.store.workers import WorkersStore

__all__ = ["FLUSH_BATCH_MAX", "Decision", "FlushBatch", "Intents", "ModelDetails", "NotLeader",
           "ScaleMark", "Store", "StoredModel", "connect", "spec_fingerprint"]


class Store(AdminReads, ModelsStore, WorkersStore, AutoscaleStore, SchedulingStore,
            ObservedStore, LifecycleStore, IntentsStore, AdaptersStore, PrefetchStore,
            ApiKeysStore):
    """Everything the services read and write in Redis."""
