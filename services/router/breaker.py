"""Circuit breaker per replica, a replica being one model on one worker: one that keeps
failing is ejected for a while.

Keyed by (model, worker), not by worker: one model's engine failing on a worker says nothing
about the other models that worker serves, which keep being routed there.

Router-local by design: each router judges the replicas it talks to, with no Redis round
trip. After the cool-down a replica gets one trial request (half-open): a success closes the
breaker, a failure ejects it again at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Replica = tuple[str, str]  # (model alias, worker id)


@dataclass
class Breaker:
    threshold: int = 3
    cooldown_s: float = 10.0
    failures: dict[Replica, int] = field(default_factory=dict)
    ejected_until: dict[Replica, float] = field(default_factory=dict)

    def allowed(self, alias: str, workers: Sequence[str], now: float) -> list[str]:
        """Workers whose replica of ``alias`` is not ejected now; all of them if every one
        is (trying beats refusing)."""
        if not self.ejected_until:  # the common case costs one check
            return list(workers)
        ok = []
        for w in workers:
            key = (alias, w)
            until = self.ejected_until.get(key)
            if until is not None and until <= now:
                del self.ejected_until[key]
                self.failures[key] = self.threshold - 1  # half-open: one more failure ejects
                until = None
            if until is None:
                ok.append(w)
        return ok or list(workers)

    def success(self, alias: str, worker: str) -> None:
        if self.failures:
            self.failures.pop((alias, worker), None)

    def failure(self, alias: str, worker: str, now: float) -> bool:
        """Count a failure; True when it ejected the replica."""
        key = (alias, worker)
        n = self.failures.get(key, 0) + 1
        self.failures[key] = n
        if n >= self.threshold and key not in self.ejected_until:
            self.ejected_until[key] = now + self.cooldown_s
            logger.warning("replica of %s on %s ejected for %.0fs after %d failures", alias,
                           worker, self.cooldown_s, n)
            return True
        return False

    def view(self, now: float) -> list[dict[str, Any]]:
        """Ejected replicas: model, worker and the seconds left on each."""
        return [{"model": a, "worker": w, "seconds_left": round(u - now, 1)}
                for (a, w), u in sorted(self.ejected_until.items()) if u > now]
