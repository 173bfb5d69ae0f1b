"""Pure replica ordering: which replica to try first, then which next on failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def order_replicas(
    replicas: Sequence[str], inflight: Mapping[str, int], turn: int
) -> list[str]:
    """Least in-flight requests first; ties rotate by ``turn`` so equal replicas share load.

    The whole list comes back so a caller can fail over down it.
    """
    n = len(replicas)
    if n == 0:
        return []
    ranked = sorted(range(n), key=lambda i: (inflight.get(replicas[i], 0), (i - turn) % n))
    return [replicas[i] for i in ranked]
