"""The interface every sink implements, and the factory that picks one."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from store_svc.ingest.records import KINDS, Row
from store_svc.store.sqlite_worker import conditions_text, key_decimal_text, time_micros

__all__ = [
    "KEY_TIMES",
    "KEY_TYPES",
    "TIME_COLUMN",
    "Batch",
    "LatestPlan",
    "Page",
    "PagePlan",
    "Prepared",
    "Reader",
    "Sink",
    "core_fields",
    "sort_key",
]

#: The column each kind's queries filter and order on.
TIME_COLUMN = {"bars": "ts", "trades": "ts", "quotes": "timestamp", "options": "ts"}

#: The sort key of each kind, as the types a cursor carries: time in microseconds,
#: then the symbol, then the rest of the table key. Every sink orders by exactly
#: this: times as instants, text as UTF-8 bytes, key Decimals by their canonical
#: text (``key_decimal_text``), a trade's exchange as (present?, text), its
#: conditions by their compact JSON text. So both sinks return the same records in
#: the same order, and a cursor is the key of the last record of a page.
KEY_TYPES: dict[str, tuple[type, ...]] = {
    "bars": (int, str, str),  # ts, symbol, resolution
    "trades": (int, str, str, int, int, str, str),  # ts, symbol, price, size, has exchange,
    # exchange, conditions
    "quotes": (int, str),  # timestamp, symbol
    "options": (int, str, int, str, str),  # ts, symbol, expiry, strike, option_type
}
#: Positions of the times (microseconds) in each sort key.
KEY_TIMES: dict[str, tuple[int, ...]] = {
    "bars": (0,),
    "trades": (0,),
    "quotes": (0,),
    "options": (0, 2),
}


def sort_key(kind: str, row: Row) -> list[int | str]:
    """The sort key of a row (in the kind's column order), as sinks order by it.

    Args:
        kind: the record kind.
        row: a validated row.

    Returns:
        The key, typed as in :data:`KEY_TYPES`.
    """
    col = dict(zip(KINDS[kind].columns, row, strict=True))
    if kind == "bars":
        return [time_micros(col["ts"]), col["symbol"], col["resolution"]]
    if kind == "trades":
        exchange = col["exchange"]
        return [
            time_micros(col["ts"]),
            col["symbol"],
            key_decimal_text(str(col["price"])),
            col["size"],
            int(exchange is not None),
            exchange or "",
            conditions_text(list(col["conditions"])),
        ]
    if kind == "quotes":
        return [time_micros(col["timestamp"]), col["symbol"]]
    return [
        time_micros(col["ts"]),
        col["symbol"],
        time_micros(col["expiry"]),
        key_decimal_text(str(col["strike"])),
        col["option_type"],
    ]


def core_fields(kind: str) -> tuple[str, ...]:
    """The fields of a record read back: the Core model's, in its order; options
    add the store's ``ts`` at the end (Core's ``OptionSnapshot`` has no time)."""
    fields = tuple(KINDS[kind].core_model.model_fields)
    return (*fields, "ts") if kind == "options" else fields


@dataclass(frozen=True, slots=True)
class PagePlan:
    """One page of a query, validated.

    Attributes:
        kind: the record kind.
        symbols: the symbols asked for (at least one, no repeats).
        resolution: bars only: just this resolution (``None``: all).
        start: first time included, microseconds since the epoch (``None``: open).
        end: first time excluded (``None``: open).
        after: the sort key of the last record of the previous page (``None``:
            first page).
        limit: most records in the page.
        fmt: the encoding of the records, ``json`` or ``msgpack``.
        descending: newest first (the sort key reversed; ``after`` then means
            "before").
    """

    kind: str
    symbols: tuple[str, ...]
    resolution: str | None
    start: int | None
    end: int | None
    after: tuple[int | str, ...] | None
    limit: int
    fmt: Literal["json", "msgpack"]
    descending: bool = False


@dataclass(frozen=True, slots=True)
class LatestPlan:
    """A latest-record lookup: per symbol (bars: per symbol and resolution)."""

    kind: str
    symbols: tuple[str, ...]
    resolution: str | None
    fmt: Literal["json", "msgpack"]


@dataclass(slots=True)
class Page:
    """Encoded records and the sort key of the last one when more follow."""

    records: list[bytes]
    next_key: list[int | str] | None


class Reader(abc.ABC):
    """Answers queries on connections of its own, never the writers'.

    Raises (every method):
        QueryTimeout: the deadline passed; the database work was cancelled.
        SinkError: the database cannot be read now.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect ahead of the first query (every method also connects when needed).

        Raises:
            SinkError: the database cannot be read now.
        """

    @abc.abstractmethod
    async def page(self, plan: PagePlan, budget: int, timeout: float) -> Page:
        """Read one page: records in sort-key order (reversed when
        ``plan.descending``) after ``plan.after``, each
        encoded in ``plan.fmt``, together at most ``budget`` bytes (at least one
        record when any is left)."""

    @abc.abstractmethod
    async def latest(self, plan: LatestPlan, timeout: float) -> list[bytes]:
        """The encoded latest record of each symbol (bars: of each symbol and
        resolution), in the order of ``plan.symbols``; symbols without data are
        left out."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections or processes. Safe to call more than once."""


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
