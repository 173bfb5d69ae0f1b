"""The services' garbage-collector tuning (shared/service.py tune_gc, GC_GEN0_THRESHOLD)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared.service import tune_gc
from shared.settings import RouterSettings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_start_up_objects_are_frozen_and_young_collections_are_rarer(restored_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(20_000)
    assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's walks
    assert gc.get_threshold() == (20_000, before[1], before[2])


def test_zero_keeps_pythons_collector(restored_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_the_setting_defaults_on_and_refuses_negatives() -> None:
    assert RouterSettings().gc_gen0_threshold == 20_000
    assert RouterSettings(gc_gen0_threshold=0).gc_gen0_threshold == 0
    with pytest.raises(ValueError):
        RouterSettings(gc_gen0_threshold=-1)
