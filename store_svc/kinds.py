"""The one catalog of record kinds: what the store knows about bars, trades, quotes
and options, from the write subject to the table.

A kind's name is the write subject's kind token and its table's name. The catalog
holds what every part of the service agrees on: the Core model, the table's record
columns in row order, the idempotency key and what a repeat write does, and which
columns hold Decimals and times. The msgspec mirrors that decode the hot path and
the row builders live with intake (``ingest/records.py``); the SQL lives with each
sink. A *row* is a tuple in ``columns`` order holding timezone-aware UTC datetimes,
Decimals, ints, strings and bools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from store_svc import core

__all__ = ["KINDS", "KindSpec", "Row", "kind_or_unknown"]

#: A validated record in its kind's column order (``ingested_at`` is not part of it).
Row = tuple[Any, ...]


@dataclass(frozen=True)
class KindSpec:
    """Everything the service knows about one record kind.

    Attributes:
        kind: the subject token (``bars`` ...), also the table name.
        core_model: the Core pydantic model.
        columns: the table's record columns, in row order (``ingested_at`` comes last).
        key: the columns of the idempotency key.
        on_conflict: ``update`` (later writes win) or ``ignore`` (the first write wins).
        decimal_columns: columns holding Decimals.
        time_columns: columns holding datetimes.
        time_column: the column queries filter and order on (TimescaleDB partitions
            on it).
    """

    kind: str
    core_model: type[BaseModel]
    columns: tuple[str, ...]
    key: tuple[str, ...]
    on_conflict: Literal["update", "ignore"]
    decimal_columns: frozenset[str]
    time_columns: frozenset[str]
    time_column: str

    @property
    def table(self) -> str:
        """The table that holds this kind."""
        return self.kind

    def to_core(self, row: Row) -> BaseModel:
        """Build the Core model of a row (used by reads and tests).

        Args:
            row: a row in ``columns`` order, with sink values already turned back
                into Python types.

        Returns:
            The Core model instance.
        """
        values = dict(zip(self.columns, row, strict=True))
        if self.kind == "options":
            values.pop("ts")
        return self.core_model(**values)


KINDS: dict[str, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            kind="bars",
            core_model=core.Bar,
            columns=(
                "symbol",
                "resolution",
                "ts",
                "open",
                "high",
                "low",
                "close",
                "volume",
                "delayed",
            ),
            key=("symbol", "resolution", "ts"),
            on_conflict="update",
            decimal_columns=frozenset({"open", "high", "low", "close", "volume"}),
            time_columns=frozenset({"ts"}),
            time_column="ts",
        ),
        KindSpec(
            kind="trades",
            core_model=core.Trade,
            columns=("symbol", "ts", "price", "size", "exchange", "conditions"),
            key=("symbol", "ts", "price", "size", "exchange", "conditions"),
            on_conflict="ignore",
            decimal_columns=frozenset({"price"}),
            time_columns=frozenset({"ts"}),
            time_column="ts",
        ),
        KindSpec(
            kind="quotes",
            core_model=core.Quote,
            columns=(
                "symbol",
                "timestamp",
                "bid",
                "ask",
                "last",
                "bid_size",
                "ask_size",
                "volume",
                "delayed",
            ),
            key=("symbol", "timestamp"),
            on_conflict="update",
            decimal_columns=frozenset({"bid", "ask", "last"}),
            time_columns=frozenset({"timestamp"}),
            time_column="timestamp",
        ),
        KindSpec(
            kind="options",
            core_model=core.OptionSnapshot,
            columns=(
                "symbol",
                "expiry",
                "strike",
                "option_type",
                "ts",
                "bid",
                "ask",
                "last",
                "volume",
                "open_interest",
                "implied_volatility",
                "delta",
                "gamma",
                "theta",
                "vega",
                "delayed",
            ),
            key=("symbol", "expiry", "strike", "option_type", "ts"),
            on_conflict="update",
            decimal_columns=frozenset(
                {
                    "strike",
                    "bid",
                    "ask",
                    "last",
                    "implied_volatility",
                    "delta",
                    "gamma",
                    "theta",
                    "vega",
                }
            ),
            time_columns=frozenset({"expiry", "ts"}),
            time_column="ts",
        ),
    )
}


def kind_or_unknown(kind: str) -> str:
    """``kind`` when it names a kind, else ``unknown`` (the label of counters and the
    DLQ subject for messages on a subject that names no kind)."""
    return kind if kind in KINDS else "unknown"
