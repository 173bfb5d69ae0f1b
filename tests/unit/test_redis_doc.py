"""docs/redis.md against the code, so the keyspace documentation cannot drift: every key
family of shared/keys.py has a row (and every row a key family), and the fields a row lists
are the fields the code writes (read back from the store's own writes, fakeredis)."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator

import fakeredis
import pytest

from services.worker.instance import Instance
from shared import records
from shared.keys import Keys
from shared.models import Assignment, Heartbeat, ModelSpec, Reservation, WorkerRegistration
from shared.store import ScaleMark, Store, StoredModel
from tests.support import ROOT

DOC = ROOT / "docs" / "redis.md"
_HOLE = "\x00"


def doc_rows() -> dict[str, dict[str, str]]:
    """key pattern (placeholders as '{}') -> the row's cells."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `svllm:"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        key, type_, writers, fields, meaning = cells
        # Placeholders are <name>; braces are hash tags, part of the key (shared/keys.py).
        pattern = re.sub(r"<[^>]*>", "{}", key.strip("`"))
        assert pattern not in rows, f"{key} documented twice"
        rows[pattern] = {"type": type_, "writers": writers, "fields": fields,
                         "meaning": meaning}
    return rows


def doc_fields(row: dict[str, str]) -> set[str]:
    return set(re.findall(r"`([^`]+)`", row["fields"]))


def code_keys() -> dict[str, str]:
    """key pattern -> the Keys member that builds it."""
    keys = Keys("svllm")
    out = {}
    for name, member in vars(Keys).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            key = getattr(keys, name)
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            key = member(keys, *[_HOLE] * len(params))
        else:
            continue
        out[key.replace(_HOLE, "{}")] = name
    return out


def test_every_key_family_is_documented_and_nothing_else() -> None:
    documented, built = set(doc_rows()), set(code_keys())
    assert built - documented == set(), "key families missing from docs/redis.md"
    assert documented - built == set(), "docs/redis.md rows with no key in shared/keys.py"


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("svllm"))
    yield s
    await s.close()


async def written_fields(store: Store) -> dict[str, set[str]]:
    """key pattern -> the fields of the record, as the code writes it."""
    k = store.k
    spec = ModelSpec(alias="m", model_name="org/m", engine="sim")
    await store.register_model(spec)
    await store.register_worker(WorkerRegistration(worker_id="w", url="http://w:1"), 60)
    await store.heartbeat("w", Heartbeat(gpus=[], gpu_message="none", load={"x": 1},
                                         local_models=[], cache_free_mb=0), 60)
    await store.set_engine_flags("w", "0.32.0", ["--max-num-seqs"])
    await store.set_placement_reason("m", "no room")
    for kind in ("cold_start", "wake"):
        await store.record_duration("m", kind, 1.0)
    await store.record_wait("m", 1.0)
    await store.set_route("m", "w", "http://w:1")
    await store.want("m", 30)
    model = StoredModel(spec=spec, version="v", created_at=0.0)
    instance = Instance("m", Assignment(alias="m", worker_id="w"), model)

    async def hkeys(key: str) -> set[str]:
        return {str(f) for f in await store.r.hkeys(key)}

    async def log_fields(key: str) -> set[str]:
        entries = await store.r.xrange(key) or []
        return {str(f) for _, entry in entries for f in entry or {}}

    return {
        "svllm:{m:{}}:model": await hkeys(k.model("m")),
        "svllm:{w:{}}:worker": await hkeys(k.worker("w")),
        "svllm:{m:{}}:placement": await hkeys(k.placement("m")),
        "svllm:{m:{}}:stats": await hkeys(k.stats("m")),
        "svllm:{m:{}}:instance:{}": set(instance.record()),
        "svllm:{s}:assign:{}": set(Assignment.model_fields),
        "svllm:{s}:ledger:{}": set(Reservation.model_fields),
        "svllm:{s}:autoscale": set(ScaleMark.model_fields),
        "svllm:{s}:log:models": await log_fields(k.models_log),
        "svllm:{s}:log:routes": await log_fields(k.routes_log),
        "svllm:{s}:log:intents": await log_fields(k.intents_log),
    }


async def test_documented_fields_are_the_fields_written(store: Store) -> None:
    rows = doc_rows()
    written = await written_fields(store)
    for pattern, fields in written.items():
        assert doc_fields(rows[pattern]) == fields, f"fields of {pattern} in docs/redis.md"
    unchecked = {p for p, row in rows.items() if doc_fields(row) and p not in written}
    assert unchecked == set(), "rows listing fields this test does not check"


async def test_parsers_know_the_fields_written(store: Store) -> None:
    """The record parsers check the numbers and fields the code actually writes."""
    written = await written_fields(store)
    numeric = set(records.INSTANCE_INTS) | set(records.INSTANCE_FLOATS)
    assert numeric <= written["svllm:{m:{}}:instance:{}"]
    assert set(records.WORKER_FIELDS) == written["svllm:{w:{}}:worker"]
