"""The read contract every queryable sink implements: plans, pages, sort keys.

The read API (``store_svc/read/``) validates a request into a :class:`PagePlan` or
:class:`LatestPlan`; a sink's :class:`Reader` runs it on connections (SQLite:
processes) of its own, never the writers', and returns records already encoded.
Every sink orders by the same sort key (:data:`KEY_TYPES`), so both return the same
records in the same order and a cursor is the key of the last record of a page.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

from store_svc.kinds import KINDS, Row
from store_svc.store.codec import conditions_text, key_decimal_text, time_micros

__all__ = [
    "KEY_TIMES",
    "KEY_TYPES",
    "LatestPlan",
    "Page",
    "PagePlan",
    "Reader",
    "core_fields",
    "sort_key",
]

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
