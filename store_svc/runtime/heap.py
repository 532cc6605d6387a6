"""Garbage-collector settings for a process that allocates per record.

CPython's cyclic collector runs a young collection every 700 net allocations of
container objects and now and then a full one over everything that survived. At
100,000+ records/s that meant thousands of collections per run (1.7 s of a 20 s
benchmark run in the main process, 0.5 s in the SQLite writer), and full collections
walking the imported modules and Core's pydantic models paused the event loop for
30-40 ms: the p99 publish→commit latency. Measured with gc callbacks on
``benchmarks/bench_ingest.py --only core-sqlite-1000-trades`` (docs/benchmarks.md).

The records themselves (msgspec Structs with ``gc=False``, tuples of atoms) are
not containers the collector follows, so a higher young threshold costs little
memory: garbage cycles (exception tracebacks, mostly) are still found, later.
"""

from __future__ import annotations

import gc

from store_svc.store.codec import GC_THRESHOLDS

__all__ = ["GC_THRESHOLDS", "settle_heap"]


def settle_heap() -> None:
    """Freeze what start-up allocated (modules, models, settings) out of the
    collector's reach and raise the young-generation threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
