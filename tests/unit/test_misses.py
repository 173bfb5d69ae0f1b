"""MissRefresher: a miss waits for a re-read begun after it arrived; misses share re-reads,
spaced apart; a failing store answers at once (services/router/misses.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.router.misses import MissRefresher


class Source:
    """A store whose value changes while a read is in flight."""

    def __init__(self, delay: float = 0.02) -> None:
        self.value = 0
        self.seen = 0
        self.reads = 0
        self.fail = False
        self.delay = delay
        self.began = asyncio.Event()

    async def read(self) -> None:
        self.reads += 1
        value = self.value  # the read's snapshot is taken when it begins
        self.began.set()
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("store down")
        self.seen = value


def test_miss_does_not_share_a_read_begun_before_it() -> None:
    async def go() -> None:
        src = Source()
        misses = MissRefresher(src.read, spacing_s=0.01)
        early = asyncio.ensure_future(misses.after(time.monotonic()))
        await src.began.wait()  # that read is in flight with value 0
        src.value = 1  # a write lands, then a request arrives
        await misses.after(time.monotonic())
        assert src.seen == 1 and src.reads == 2
        await early

    asyncio.run(go())


def test_concurrent_misses_share_spaced_reads() -> None:
    async def go() -> None:
        src = Source(delay=0.005)
        misses = MissRefresher(src.read, spacing_s=0.1)
        began = time.monotonic()
        await asyncio.gather(*(misses.after(time.monotonic()) for _ in range(200)))
        assert src.reads == 1
        # Back-to-back misses: each needs a new read, and reads start 0.1 s apart.
        for _ in range(3):
            await misses.after(time.monotonic())
        assert src.reads == 4
        assert time.monotonic() - began >= 0.3
        assert misses.reads == 4

    asyncio.run(go())


def test_failing_store_answers_at_once() -> None:
    async def go() -> None:
        src = Source()
        src.fail = True
        # Spaced 30 s apart: a miss that waited for a re-read would take that long.
        misses = MissRefresher(src.read, spacing_s=30)
        await misses.after(time.monotonic())  # one failed read, then it gives up
        assert src.reads == 1
        # The failed read marked the store down: the next miss answers from the cache.
        began = time.monotonic()
        await misses.after(time.monotonic())
        assert src.reads == 1 and time.monotonic() - began < 10
        # The owner's timer read succeeds: misses re-read again.
        src.fail = False
        await misses.read()
        assert misses.store_ok and src.reads == 2

    asyncio.run(go())


def test_a_read_that_timed_out_marks_the_store_down() -> None:
    async def go() -> None:
        # The router's first load, cut off by its timeout while Redis hangs: misses then
        # answer from the cache at once instead of each waiting out a Redis timeout.
        src = Source(delay=30)
        misses = MissRefresher(src.read, spacing_s=0.01)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(misses.read(), 0.05)
        assert not misses.store_ok
        began = time.monotonic()
        await misses.after(time.monotonic())
        assert src.reads == 1 and time.monotonic() - began < 10

    asyncio.run(go())
