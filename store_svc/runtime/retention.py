"""Retention: rows older than ``STORE_RETENTION_<KIND>`` are removed on a schedule,
off the write path.

A pass runs shortly after start-up, then every ``STORE_RETENTION_INTERVAL_S``. For each
kind with a retention it asks the sink to remove what is older than *now minus the
retention*, in steps of at most ``STORE_RETENTION_BATCH`` rows, pausing between steps,
so a write waits for one small step at most (SQLite's single writer takes writes and
deletes in turn; PostgreSQL deletes beside the writers). TimescaleDB drops whole
chunks instead. Where several instances share a PostgreSQL database, one of them
runs each pass (an advisory lock); the others count it as skipped.

Records older than the retention that arrive later are refused at the edge
(``beyond_retention``), so a pass never has to chase them.

Every pass is counted (done, skipped, failed), with the rows removed per kind, in the
health component ``retention`` and the metrics. A failed pass is logged and retried at
the next interval; it never stops the service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from store_svc.errors import SinkError
from store_svc.settings import Settings, format_duration
from store_svc.state import Stats
from store_svc.store.base import Sink

__all__ = ["RetentionRunner"]

log = logging.getLogger(__name__)

#: The first pass waits this long after start-up (the service settles first).
FIRST_PASS_AFTER_S = 1.0

#: The pause between two steps of a pass: writes queued meanwhile go first.
STEP_PAUSE_S = 0.02


class RetentionRunner:
    """Runs retention passes over ``sink`` for the kinds that have a retention.

    Args:
        sink: the open sink.
        settings: ``retention_*``.
        stats: where passes and removed rows are counted.
    """

    def __init__(self, sink: Sink, settings: Settings, stats: Stats) -> None:
        self._sink = sink
        self._kept = settings.retentions
        self._every = settings.retention_interval_s
        self._batch = settings.retention_batch
        self._stats = stats

    @property
    def configured(self) -> bool:
        """Whether any kind has a retention."""
        return bool(self._kept)

    async def run(self) -> None:
        """Pass after pass until cancelled."""
        await asyncio.sleep(FIRST_PASS_AFTER_S)
        while True:
            await self.run_pass()
            await asyncio.sleep(self._every)

    async def run_pass(self) -> dict[str, int] | None:
        """One pass; returns the rows removed per kind, or None when another instance
        ran it or it failed (both counted)."""
        now = datetime.now(UTC)
        cutoffs = {kind: now - kept for kind, kept in self._kept.items()}
        stats = self._stats
        began = time.monotonic()
        try:
            removed = await self._sink.expire_pass(cutoffs, self._batch, STEP_PAUSE_S)
        except Exception as exc:
            stats.retention_failed += 1
            text = str(exc) if isinstance(exc, SinkError) else f"{type(exc).__name__}: {exc}"
            stats.retention_last_error = text[:500]
            log.error("retention pass failed (retried in %gs): %s", self._every, text)
            return None
        stats.retention_last_pass = time.time()
        stats.retention_last_error = ""
        if removed is None:
            stats.retention_skipped += 1
            log.debug("retention pass skipped: another instance holds the turn")
            return None
        stats.retention_done += 1
        stats.retention_removed.update(removed)
        if any(removed.values()):
            log.info(
                "retention pass removed %s in %.1fs",
                ", ".join(f"{n:,} {k} (older than {format_duration(self._kept[k])})"
                          for k, n in removed.items() if n),
                time.monotonic() - began,
            )  # fmt: skip
        return removed

    def describe(self) -> dict[str, str]:
        """The retention of each kind, as set (``trades`` -> ``90d``)."""
        return {kind: format_duration(kept) for kind, kept in self._kept.items()}
