"""The write interface every sink implements (:class:`Sink`), and what a batch is.

A sink commits whole batches in one transaction with idempotent upserts; one that
can overlap work prepares the next batch while the one ahead commits
(:class:`Prepared`). Reads are a separate contract (``reads.py``): a sink that can
be queried hands out a :class:`~store_svc.store.reads.Reader` of its own. Retention
removes old rows in small steps (:meth:`Sink.expire`) within one pass
(:meth:`Sink.expire_pass`), which a shared database lets one instance run at a time.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import NamedTuple, Self

from store_svc.errors import SinkError
from store_svc.kinds import Row
from store_svc.store.reads import Reader

__all__ = ["Batch", "Expired", "Prepared", "Sink"]


class Expired(NamedTuple):
    """What one retention step removed.

    Attributes:
        rows: rows removed (TimescaleDB: counted from the chunks' statistics).
        more: whether older rows may be left (another step is due).
    """

    rows: int
    more: bool


#: Rows to commit in one transaction, grouped by kind (``bars`` ...).
Batch = Mapping[str, Sequence[Row]]


class Prepared(abc.ABC):
    """A batch sent to the database ahead of its commit (see :meth:`Sink.prepare`)."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the batch durable in one transaction.

        Raises:
            SinkError: nothing of the batch was committed; the sink has released
                whatever the preparation held.
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Give the batch up. Safe to call more than once.

        A sink that has already handed the batch to the database (SQLite's writer
        process) cannot call it back, and it may still commit; writes are idempotent,
        so that costs a repeat at most.
        """


class Sink(abc.ABC):
    """A store for validated rows.

    A sink is an async context manager: ``open`` creates the schema if needed,
    ``close`` is idempotent. ``write`` commits a whole batch in one transaction or
    raises :class:`~store_svc.errors.SinkError` having committed nothing.
    """

    #: Short name shown in health and logs.
    name: str = "sink"
    #: Whether :meth:`prepare` overlaps a batch with the commit of the one ahead.
    overlaps_writes: bool = False
    #: What a long :meth:`open` is doing now (e.g. converting a table), for health;
    #: empty when nothing is under way.
    progress: str = ""

    def details(self) -> dict[str, str]:
        """What health's ``sink`` component shows of this sink (e.g. its layout)."""
        return {}

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create or check the schema.

        Raises:
            SinkError: the database cannot be reached or used.
            SchemaError: the database holds a newer schema than this version knows.
        """

    @abc.abstractmethod
    async def write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction with idempotent upserts.

        Args:
            batch: rows per kind.

        Raises:
            SinkError: nothing of the batch was committed.
        """

    async def prepare(self, batch: Batch) -> Prepared | None:
        """Start writing ``batch`` while the batch ahead of it is still committing.

        A sink that can overlap work (send and stage rows on a second connection)
        returns a :class:`Prepared` whose ``commit`` the batcher calls only after the
        batch ahead has committed or been given up, so corrections to one key land
        in the order they arrived. The default cannot, and returns ``None``.

        Args:
            batch: rows per kind.

        Returns:
            The prepared batch, or ``None`` when the sink does not overlap writes.

        Raises:
            SinkError: the batch could not be prepared (the batcher then writes it
                the ordinary way).
        """
        return None

    def reader(self, concurrency: int) -> Reader | None:
        """A reader for the query API, on connections separate from the writes.

        Args:
            concurrency: queries that may run at once.

        Returns:
            The reader (opened on first use), or ``None`` when the sink cannot be
            queried.
        """
        return None

    async def expire(self, kind: str, before: datetime, limit: int) -> Expired:
        """Remove up to ``limit`` rows of ``kind`` whose time is before ``before``.

        Returns:
            The rows removed, and whether another step is due.

        Raises:
            SinkError: the rows could not be removed (nothing of this step was).
        """
        raise SinkError(f"the {self.name} sink cannot remove old rows", retryable=False)

    @contextlib.asynccontextmanager
    async def retention_turn(self) -> AsyncIterator[bool]:
        """Whether this instance runs the retention pass now (a database shared by
        several instances gives one of them the turn); held while the pass runs."""
        yield True

    async def expire_pass(
        self, cutoffs: Mapping[str, datetime], limit: int, pause_s: float
    ) -> dict[str, int] | None:
        """Remove the rows older than each kind's cut-off, ``limit`` rows per step,
        pausing ``pause_s`` between steps so writes go first.

        Returns:
            The rows removed per kind, or ``None`` when another instance has the turn.

        Raises:
            SinkError: a step failed (the steps before it stay done).
        """
        async with self.retention_turn() as mine:
            if not mine:
                return None
            removed: dict[str, int] = {}
            for kind, before in cutoffs.items():
                removed[kind] = 0
                while True:
                    step = await self.expire(kind, before, limit)
                    removed[kind] += step.rows
                    if not step.more:
                        break
                    await asyncio.sleep(pause_s)
            return removed

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection(s). Safe to call more than once."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
