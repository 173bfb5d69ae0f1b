"""Pure replica choice: which replica to try first, then which next on failure. No I/O.

Least outstanding requests by power of two choices: two replicas drawn at random, the less
loaded first. Load = this router's own in-flight requests to the replica plus the engine's
running and waiting requests as its worker last reported them (which include other routers'
traffic). With an affinity key (the request's ``user`` or an ``x-session-id`` header) the
replica is chosen by rendezvous hashing, so a conversation keeps hitting one prefix cache
while the replica set is stable, and only 1/n of keys move when it changes. Without one, a
request with a long prompt prefix (:mod:`services.router.prefix`) is placed the same way on
its prefix, unless that replica has more than ``slack`` requests more than the least loaded
one: then least outstanding wins, so a hot prefix cannot pile onto one replica.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping, Sequence


def load_of(replica: str, inflight: Mapping[str, int], reported: Mapping[str, float]) -> float:
    return inflight.get(replica, 0) + reported.get(replica, 0.0)


def rendezvous(replicas: Sequence[str], key: str) -> list[str]:
    """Replicas ordered by highest random weight for ``key`` (stable, consistent)."""

    def weight(r: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


def order_replicas(
    replicas: Sequence[str],
    inflight: Mapping[str, int],
    reported: Mapping[str, float] | None = None,
    affinity: str | None = None,
    rng: random.Random | None = None,
    prefix: str | None = None,
    slack: float = 4,
) -> list[str]:
    """Every replica, in the order to try them. ``replicas`` must not include ejected ones."""
    reported = reported or {}
    if len(replicas) <= 1:
        return list(replicas)
    if affinity:
        return rendezvous(replicas, affinity)
    if prefix:
        ranked = rendezvous(replicas, prefix)
        least = min(load_of(x, inflight, reported) for x in replicas)
        if load_of(ranked[0], inflight, reported) - least <= slack:
            return ranked
    r = rng or random
    a, b = r.sample(list(replicas), 2)
    first, second = (a, b) if load_of(a, inflight, reported) <= load_of(b, inflight, reported) \
        else (b, a)
    rest = sorted((x for x in replicas if x not in (first, second)),
                  key=lambda x: load_of(x, inflight, reported))
    return [first, second, *rest]


def holders_first(ordered: Sequence[str], holders: Collection[str]) -> list[str]:
    """``ordered`` with the replicas in ``holders`` (those whose engine already holds the
    LoRA adapter asked for) moved to the front, each group keeping its order."""
    if not holders:
        return list(ordered)
    return [r for r in ordered if r in holders] + [r for r in ordered if r not in holders]
