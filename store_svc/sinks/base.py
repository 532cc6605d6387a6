"""The interface every sink implements, and the factory that picks one."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

from ..records import Row

__all__ = ["Batch", "Sink"]

#: Rows to commit in one transaction, grouped by kind (``bars`` ...).
Batch = Mapping[str, Sequence[Row]]


class Sink(abc.ABC):
    """A store for validated rows.

    A sink is an async context manager: ``open`` creates the schema if needed,
    ``close`` is idempotent. ``write`` commits a whole batch in one transaction or
    raises :class:`~store_svc.errors.SinkError` having committed nothing.
    """

    #: Short name shown in health and logs.
    name: str = "sink"

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

    @abc.abstractmethod
    async def rows(self, kind: str) -> list[Row]:
        """Every stored row of ``kind``, in key order, values as Python types.

        Args:
            kind: ``bars``, ``trades``, ``quotes`` or ``options``.

        Returns:
            Rows in the kind's column order (without ``ingested_at``).
        """

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Rows stored per table.

        Returns:
            A mapping of kind to row count.
        """

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
