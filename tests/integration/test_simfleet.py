"""bench.simfleet plays workers with raw commands; its figures mean something only while those
commands are what the real store code sends. Checked against a real redis-server: a fleet
heartbeat leaves the records a real one does (a full one and a bare refresh), and the fleet's
re-read finds the models."""

from __future__ import annotations

import asyncio
import uuid

from bench.simfleet import Conn, Fleet
from shared.keys import Keys
from shared.models import Heartbeat, ModelSpec, WorkerRegistration
from shared.pace import heartbeat_pace
from shared.store import Store, connect
from tests.support import RedisServer


async def _compare(url: str) -> None:
    keys = Keys(f"fleet-{uuid.uuid4().hex[:8]}")
    store = Store(connect(url), keys)
    conn = await Conn.open(url)
    try:
        for w in ("real", "sim"):
            await store.register_worker(WorkerRegistration(
                worker_id=w, url=f"http://{w}:7000", engines=["vllm"], gpu_message="x",
                version="t"), 30)
        await store.register_model(ModelSpec(alias="m", model_name="org/m", engine="vllm"))
        hb = Heartbeat(gpus=[], gpu_message="no GPU (simulated)", load={"instances": 10.0})
        assert await store.heartbeat("real", hb, 30.0) is True
        fleet = Fleet(keys, ["sim"])
        fleet.beat_at["sim"] = fleet.check_at["sim"] = 0.0
        await fleet.tick(conn)
        assert fleet.done == {"heartbeats": 1, "reconciles": 1}
        real = await store.r.hgetall(keys.worker("real"))
        sim = await store.r.hgetall(keys.worker("sim"))
        for f in ("load", "gpus", "gpu_message"):
            assert sim[f] == real[f], f
        assert float(sim["last_seen"]) > 0
        assert await store.alive(["real", "sim"]) == {"real", "sim"}
        pttl = await store.r.pttl(keys.worker_alive("sim"))
        assert 25_000 < pttl <= 30_000
        revs = await store.worker_revs()
        assert revs["sim"] == revs["real"] == "2"  # registered, then a full beat
        # A beat that reports nothing new refreshes the alive key alone, in both.
        before = await store.r.get(keys.worker_alive("sim"))
        assert await store.heartbeat("real", Heartbeat(), 30.0) is True
        fleet.beat_at["sim"] = 0.0
        await fleet.tick(conn)
        assert fleet.done["heartbeats"] == 2
        assert await store.worker_revs() == revs
        assert await store.r.hgetall(keys.worker("sim")) == sim
        assert float(str(await store.r.get(keys.worker_alive("sim")))) > float(str(before))
        # Its assignment check and re-read match the real reader's view of the stamp.
        stamp = await store.assignment_stamp("sim")
        assert tuple(str(x or "0") for x in fleet.stamp["sim"]) == stamp
    finally:
        conn.writer.close()
        await store.close()


def test_fleet_heartbeat_writes_what_a_real_one_does(redis_server: RedisServer) -> None:
    asyncio.run(_compare(redis_server.url))


async def _paced(url: str) -> None:
    keys = Keys(f"fleet-{uuid.uuid4().hex[:8]}")
    store = Store(connect(url), keys)
    conn = await Conn.open(url)
    try:
        for w in ("a", "b", "c"):
            await store.register_worker(WorkerRegistration(
                worker_id=w, url=f"http://{w}:7000", engines=["vllm"], gpu_message="x",
                version="t"), 30)
        # At a quarter of a beat a second, three workers beating every 2 s are paced 6x.
        fleet = Fleet(keys, ["a", "b"], max_per_s=0.25)
        assert fleet.pace == 1.0  # as a real worker: unpaced until it counts the pool
        # One full beat and, after it in the same tick, a bare one: the pace is the full
        # beat's count, whatever beat comes last.
        fleet.beat_at["a"] = fleet.beat_at["b"] = 0.0
        fleet.full_at["b"] = float("inf")
        await fleet.tick(conn)
        assert fleet.pace == heartbeat_pace(await store.worker_count(), 2.0, 0.25) == 6.0
        # The beat just sent had an unpaced TTL, so the next one comes unpaced (as the real
        # worker's wait follows the TTL it last wrote); the ones after it at the new pace.
        assert fleet.beat_at["a"] == fleet.beat_at["b"] == 2.0
        fleet.beat_at["a"] = fleet.beat_at["b"] = 0.0
        await fleet.tick(conn)  # two bare beats: no count, the pace stays
        assert fleet.pace == 6.0
        assert fleet.beat_at["a"] == fleet.beat_at["b"] == 12.0
    finally:
        conn.writer.close()
        await store.close()


def test_fleet_paces_its_workers_as_real_ones_do(redis_server: RedisServer) -> None:
    asyncio.run(_paced(redis_server.url))
