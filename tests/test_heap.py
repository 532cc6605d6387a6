"""The collector settings applied at start-up (store_svc/runtime/heap.py)."""

from __future__ import annotations

import gc

import pytest

from store_svc.runtime.heap import GC_THRESHOLDS, settle_heap

pytestmark = pytest.mark.logic


def test_settle_heap_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == GC_THRESHOLDS
        # Cycles made afterwards are still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
