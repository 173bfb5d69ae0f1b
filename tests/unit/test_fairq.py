"""The queue policy of a model at its max_inflight: priority order, fair share between
tenants, the bound and the deadline (services/router/fairq.py and admission.py)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from services.router.admission import EnginePriority, Gate, Slot
from services.router.fairq import FairQueue
from services.router.routes import RouteTable
from shared.errors import NoCapacity, QueueFull
from shared.events import Nudger
from shared.models import ModelSpec
from shared.principal import Principal
from shared.store import Store, StoredModel


def drain(q: FairQueue[str]) -> list[str]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_priority_first_then_arrival_within_a_tenant() -> None:
    q: FairQueue[str] = FairQueue()
    for item, prio in [("n1", "normal"), ("l1", "low"), ("h1", "high"), ("n2", "normal"),
                       ("h2", "high")]:
        q.push(item, "t", prio)
    assert drain(q) == ["h1", "h2", "n1", "n2", "l1"]
    assert len(q) == 0


def test_a_tenant_with_a_long_backlog_does_not_starve_a_small_one() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(48):
        q.push(f"a{i}", "A")
    q.push("b0", "B")
    q.push("b1", "B")
    order = drain(q)
    # B arrived after all of A's 48, yet is served alternately with A from the start.
    assert order.index("b0") <= 1 and order.index("b1") <= 3
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(48)]


def test_share_follows_cost_and_idle_tenants_bank_no_credit() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.push(f"a{i}", "A", cost=1.0)
        q.push(f"b{i}", "B", cost=3.0)
    assert q.pop() in ("a0", "b0")
    order = drain(q)
    # A's requests cost a third of B's: A gets about three turns per B turn.
    assert order.index("b1") > order.index("a2")
    # Served a lot before, then back after the queue had a third tenant waiting only.
    for i in range(10):
        q.push(f"c{i}", "C")
    for _ in range(5):
        q.pop()
    q.push("a-late", "A")
    assert q.counter("A") == q.counter("C") - 1  # lifted to the last served counter
    assert q.pop() == "a-late"


def test_cancelled_entries_are_skipped_and_counted_out() -> None:
    q: FairQueue[str] = FairQueue()
    first = q.push("x", "A")
    q.push("y", "A")
    high = q.push("z", "B", "high")
    q.cancel(first)
    q.cancel(high)
    q.cancel(high)  # twice is once
    assert len(q) == 1
    assert drain(q) == ["y"]
    assert q.counter("A") == 0  # the queue emptied: counters forgotten


def test_a_served_tenant_waits_at_every_level_behind_the_others() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a-low", "A", "low")
    q.push("b-low", "B", "low")
    q.push("a-high", "A", "high")
    assert q.pop() == "a-high"  # charges A
    assert q.pop() == "b-low"  # so at the low level B, not A, goes first
    assert q.pop() == "a-low"


# --- the gate: capacity, bound, deadline -----------------------------------------------------


def gate_with(max_inflight: int | None, replicas: int, queue_max: int = 4,
              timeout_s: float = 5.0, routers: int = 1,
              extra_args: list[str] | None = None) -> Gate:
    table = RouteTable(cast(Store, None), cast(Nudger, None), 1.0)
    spec = ModelSpec(alias="m", model_name="x/y", engine="vllm", max_inflight=max_inflight,
                     extra_args=extra_args or [])
    table.models = {"m": StoredModel(spec, "1", 0.0)}
    table.routes = {"m": {f"w{i}": f"http://w{i}" for i in range(replicas)}}
    return Gate(table, queue_max, timeout_s, lambda: routers)


async def enter(gate: Gate, principal: Principal) -> Slot:
    cap = gate.cap("m")
    assert cap is not None
    return await gate.enter("m", cap, principal)


def who(tenant: str, priority: str = "normal") -> Principal:
    return Principal(f"k-{tenant}", tenant, tenant, priority)


async def test_no_cap_costs_nothing_and_takes_no_slot() -> None:
    gate = gate_with(None, 1)
    assert gate.cap("m") is None and gate.cap("unknown") is None
    assert gate.models == {}


async def test_cap_per_replica_and_share_per_router() -> None:
    gate = gate_with(4, 2, routers=2)
    assert gate.capacity("m", 4) == 4  # 2 per replica on each of 2 routers
    slots = [await enter(gate, who("a")) for _ in range(4)]
    assert all(s is not None for s in slots)
    waiting = asyncio.ensure_future(enter(gate, who("a")))
    await asyncio.sleep(0)
    assert not waiting.done() and len(gate.models["m"].queue) == 1
    gate.release(slots[0])
    assert (await waiting) is not None
    assert gate.models["m"].active == 4


async def test_bound_gives_429_queue_full_with_retry_after() -> None:
    gate = gate_with(1, 1, queue_max=2)
    await enter(gate, who("a"))
    queued = [asyncio.ensure_future(enter(gate, who("a"))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as e:
        await enter(gate, who("b"))
    assert e.value.status == 429 and e.value.code == "queue_full"
    assert int(e.value.headers["Retry-After"]) >= 1
    for f in queued:
        f.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert len(gate.models["m"].queue) == 0


async def test_deadline_gives_503_queue_timeout_and_leaves_the_queue() -> None:
    gate = gate_with(1, 1, timeout_s=0.2)
    held = await enter(gate, who("a"))
    started = time.monotonic()
    with pytest.raises(NoCapacity) as e:
        await enter(gate, who("b"))
    assert 0.2 <= time.monotonic() - started < 1.0
    assert e.value.status == 503 and e.value.code == "queue_timeout"
    assert "Retry-After" in e.value.headers
    assert len(gate.models["m"].queue) == 0
    gate.release(held)
    assert gate.view() == {}  # nothing in flight or queued


async def test_queued_requests_go_by_priority_then_tenant() -> None:
    gate = gate_with(1, 1, queue_max=10)
    held = await enter(gate, who("a"))
    order: list[str] = []

    async def one(name: str, p: Principal) -> None:
        slot = await enter(gate, p)
        order.append(name)
        await asyncio.sleep(0)
        gate.release(slot)

    tasks = [asyncio.ensure_future(one(n, p)) for n, p in [
        ("a-low", who("a", "low")), ("a1", who("a")), ("a2", who("a")), ("b1", who("b")),
        ("c-high", who("c", "high"))]]
    await asyncio.sleep(0)
    gate.release(held)
    await asyncio.gather(*tasks)
    assert order == ["c-high", "a1", "b1", "a2", "a-low"]


async def test_a_slot_handed_to_a_request_that_left_goes_back() -> None:
    gate = gate_with(1, 1)
    held = await enter(gate, who("a"))
    leaving = asyncio.ensure_future(enter(gate, who("b")))
    await asyncio.sleep(0)
    gate.release(held)  # hands the slot to `leaving` ...
    leaving.cancel()  # ... whose client goes away before it runs
    outcome = (await asyncio.gather(leaving, return_exceptions=True))[0]
    if isinstance(outcome, Slot):  # asyncio.wait_for may prefer the result to the cancel
        gate.release(outcome)
    else:
        assert isinstance(outcome, asyncio.CancelledError)
    assert gate.view() == {}  # either way the slot is free again
    assert await enter(gate, who("c")) is not None


def test_engine_priority_is_read_from_the_engine_arguments() -> None:
    check = EnginePriority()
    on = ModelSpec(alias="p", model_name="x/y", engine="vllm",
                   extra_args=["--scheduling-policy=priority"])
    off = ModelSpec(alias="f", model_name="x/y", engine="vllm",
                    extra_args=["--scheduling-policy", "fcfs"])
    assert check(on) and check(on) and not check(off)
    assert not check(ModelSpec(alias="p", model_name="x/y", engine="vllm"))  # spec changed


async def test_each_replica_gets_at_most_its_share() -> None:
    gate = gate_with(2, 3, routers=2)  # 1 slot per replica on this router
    slots = [await enter(gate, who("a")) for _ in range(3)]
    for slot in slots:
        free = gate.below_share(slot, ["w0", "w1", "w2"])
        gate.seat(slot, free[0])
    assert gate.view()["m"]["by_replica"] == {"w0": 1, "w1": 1, "w2": 1}
    gate.seat(slots[0], "w1")  # a failover moves the request: w0 is free again
    assert gate.below_share(slots[1], ["w0", "w1", "w2"]) == ["w0"]
    gate.release(slots[0])
    assert gate.view()["m"] == {"inflight": 2, "slots": 3, "queued": 0,
                                "by_replica": {"w1": 1, "w2": 1}}
    # None free (a replica ejected while its slot is counted): any replica rather than wait.
    assert gate.below_share(slots[1], ["w1", "w2"]) == ["w1", "w2"]
