"""Circuit breaker per replica: one that keeps failing is ejected for a while.

Router-local by design: each router judges the replicas it talks to, with no Redis round
trip. After the cool-down a replica gets one trial request (half-open): a success closes the
breaker, a failure ejects it again at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Breaker:
    threshold: int = 3
    cooldown_s: float = 10.0
    failures: dict[str, int] = field(default_factory=dict)
    ejected_until: dict[str, float] = field(default_factory=dict)

    def allowed(self, replicas: Sequence[str], now: float) -> list[str]:
        """Replicas not ejected now; all of them if every one is (trying beats refusing)."""
        for r, until in list(self.ejected_until.items()):
            if until <= now:
                del self.ejected_until[r]
                self.failures[r] = self.threshold - 1  # half-open: one more failure ejects
        ok = [r for r in replicas if r not in self.ejected_until]
        return ok or list(replicas)

    def success(self, replica: str) -> None:
        self.failures.pop(replica, None)

    def failure(self, replica: str, now: float) -> None:
        n = self.failures.get(replica, 0) + 1
        self.failures[replica] = n
        if n >= self.threshold and replica not in self.ejected_until:
            self.ejected_until[replica] = now + self.cooldown_s
            logger.warning("replica %s ejected for %.0fs after %d failures", replica,
                           self.cooldown_s, n)

    def view(self, now: float) -> dict[str, float]:
        """Ejected replicas and the seconds left on each."""
        return {r: round(u - now, 1) for r, u in self.ejected_until.items() if u > now}
