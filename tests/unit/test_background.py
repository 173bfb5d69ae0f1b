"""shared.service.background ends every task it started, even one that drops a cancellation
(as Python 3.11's wait_for can when the cancel lands as its inner wait completes)."""

from __future__ import annotations

import asyncio

from shared.service import background


async def test_a_task_that_drops_one_cancellation_is_cancelled_again() -> None:
    dropped = 0

    async def stubborn() -> None:
        nonlocal dropped
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if dropped:
                    raise
                dropped += 1  # the first cancellation lost, as in the wait_for race

    async with background(stubborn()):
        await asyncio.sleep(0)
    assert dropped == 1
