"""``MODELS_FILE``: the scheduling manager applies a declarative models file at start and
whenever it changes (polling its mtime), with the same semantics as ``svllm apply``.

Only the lease holder applies, so two managers pointed at the file do not both restart a
changed model; a manager that becomes leader applies its file once on taking over. A file
that fails to parse or validate changes nothing and is logged with the entry at fault; it
is tried again when it changes. A Redis error is retried on the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from redis.exceptions import RedisError

from shared import models_file
from shared.engine_policy import Sandbox
from shared.errors import ApiError
from shared.store import Store

logger = logging.getLogger(__name__)

Stamp = tuple[int, int, int]


def _stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class ModelsFileWatcher:
    def __init__(self, path: Path, store: Store, *, default_engine: str, prune: bool,
                 poll_s: float, is_leader: Callable[[], bool],
                 sandbox: Sandbox | None = None) -> None:
        self.path = path
        self.sandbox = sandbox
        self.store = store
        self.default_engine = default_engine
        self.prune = prune
        self.poll_s = poll_s
        self.is_leader = is_leader
        # The file version last applied (or found invalid): nothing to do until it changes.
        self.done: Stamp | None = None
        self.missing_logged = False

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next poll tries again; the loop must outlive a bad pass
                logger.exception("MODELS_FILE %s: check failed", self.path)
            await asyncio.sleep(self.poll_s)

    async def check(self) -> None:
        if not self.is_leader():
            self.done = None  # a later leadership applies the file again
            return
        stamp = _stamp(self.path)
        if stamp is None:
            if not self.missing_logged:
                logger.error("MODELS_FILE %s cannot be read; nothing applied", self.path)
                self.missing_logged = True
            return
        self.missing_logged = False
        if stamp == self.done:
            return
        try:
            desired, adapters = await models_file.plan(
                self.store, models_file.read_document(self.path), self.default_engine,
                self.sandbox, self.prune)
            diff = await models_file.apply(self.store, desired, prune=self.prune,
                                           dry_run=False, adapters=adapters)
        except models_file.SpecError as e:
            logger.error("MODELS_FILE %s not applied: %s", self.path, e.message)
            self.done = stamp
            return
        except (RedisError, ApiError) as e:
            logger.warning("MODELS_FILE %s: apply failed, retrying: %s", self.path, e)
            return
        self.done = stamp
        logger.info("MODELS_FILE %s applied: added %s, changed %s, %s %s, unchanged %d",
                    self.path, diff.added, sorted(diff.changed),
                    "removed" if self.prune else "not in the file (kept)", diff.removed,
                    len(diff.unchanged))
        if diff.adapters is not None:
            a = diff.adapters
            logger.info("MODELS_FILE %s adapters: added %s, changed %s, %s %s, unchanged %d",
                        self.path, a.added, sorted(a.changed),
                        "removed" if self.prune else "not in the file (kept)", a.removed,
                        len(a.unchanged))
