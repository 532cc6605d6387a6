"""An in-memory sink for logic tests of the queue and the batcher (never for features)."""

from __future__ import annotations

import asyncio
from datetime import datetime

from store_svc.errors import SinkError
from store_svc.kinds import KINDS, Row
from store_svc.store.base import Batch, Expired, Prepared, Sink

__all__ = ["MemorySink"]


class _Ahead(Prepared):
    def __init__(self, sink: MemorySink, batch: Batch) -> None:
        self._sink = sink
        self._batch: Batch | None = batch

    async def commit(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            raise SinkError("already committed or given up")
        await self._sink.write(batch)

    async def abort(self) -> None:
        self._batch = None


class MemorySink(Sink):
    """Keeps rows in dicts keyed like the real tables; can be slowed or made to fail.

    Attributes:
        delay: seconds each ``write`` takes.
        fail: when set, ``write`` raises a retryable :class:`SinkError`.
        batches: the size of every committed batch, in order.
        prepared: batches handed over ahead of their commit (with ``overlap``).
    """

    name = "memory"

    def __init__(self, delay: float = 0.0, overlap: bool = False) -> None:
        self.delay = delay
        self.overlaps_writes = overlap
        self.prepared = 0
        self.fail = False
        self.batches: list[int] = []
        self._tables: dict[str, dict[tuple[object, ...], Row]] = {k: {} for k in KINDS}
        self.gate = asyncio.Event()
        self.gate.set()

    async def open(self) -> None:
        """Nothing to connect to."""

    async def write(self, batch: Batch) -> None:
        """Store the batch after ``delay`` (and after ``gate`` is set).

        Raises:
            SinkError: when ``fail`` is set.
        """
        await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise SinkError("memory sink told to fail")
        for kind, rows in batch.items():
            spec = KINDS[kind]
            index = [spec.columns.index(c) for c in spec.key]
            table = self._tables[kind]
            for row in rows:
                key = tuple(row[i] for i in index)
                if spec.on_conflict == "update" or key not in table:
                    table[key] = row
        self.batches.append(sum(len(r) for r in batch.values()))

    async def prepare(self, batch: Batch) -> Prepared | None:
        """With ``overlap``, a batch whose ``commit`` writes it; otherwise ``None``."""
        if not self.overlaps_writes:
            return None
        self.prepared += 1
        return _Ahead(self, batch)

    async def rows(self, kind: str) -> list[Row]:
        """Rows of ``kind`` in insertion order of their keys."""
        return list(self._tables[kind].values())

    async def expire(self, kind: str, before: datetime, limit: int) -> Expired:
        """Remove up to ``limit`` rows of ``kind`` older than ``before``."""
        spec = KINDS[kind]
        at = spec.columns.index(spec.time_column)
        table = self._tables[kind]
        doomed = [key for key, row in table.items() if row[at] < before][:limit]
        for key in doomed:
            del table[key]
        return Expired(len(doomed), more=len(doomed) == limit)

    async def counts(self) -> dict[str, int]:
        """Rows per kind."""
        return {k: len(v) for k, v in self._tables.items()}

    async def close(self) -> None:
        """Nothing to release."""
