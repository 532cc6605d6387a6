"""SQLite sink: the embedded default.

One connection, owned by one worker thread, so no database call ever runs on the
event loop. WAL journal, one transaction per batch, idempotent upserts on the keys
of the store layout. Values are stored losslessly: Decimals as their exact text
(key columns ``trades.price`` and ``options.strike`` in normalised form, so ``1.5``
and ``1.50`` are one key as in PostgreSQL), times as INTEGER microseconds since the
Unix epoch, UTC (exact, compact, and fast to compare; read them in the sqlite3
shell with ``strftime('%Y-%m-%dT%H:%M:%fZ', ts / 1e6, 'unixepoch')``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ..errors import SchemaError, SinkError
from ..records import EPOCH, KINDS, KindSpec, Row
from .base import Batch, Sink

__all__ = ["SCHEMA_VERSION", "SqliteSink"]

#: Bump with every change of the DDL below; a database with a higher number is refused.
SCHEMA_VERSION = 1

_T = TypeVar("_T")

_DDL = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bars (
    symbol TEXT NOT NULL, resolution TEXT NOT NULL, ts INTEGER NOT NULL,
    open TEXT NOT NULL, high TEXT NOT NULL, low TEXT NOT NULL, close TEXT NOT NULL,
    volume TEXT NOT NULL, delayed INTEGER NOT NULL, ingested_at INTEGER NOT NULL,
    PRIMARY KEY (symbol, resolution, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trades (
    symbol TEXT NOT NULL, ts INTEGER NOT NULL, price TEXT NOT NULL, size INTEGER NOT NULL,
    exchange TEXT, conditions TEXT NOT NULL, ingested_at INTEGER NOT NULL
);
-- A NULL exchange is keyed as the blob x'00', which equals no text, so NULL and ''
-- stay distinct while a redelivered NULL-exchange trade still collides with itself.
CREATE UNIQUE INDEX IF NOT EXISTS trades_key
    ON trades (symbol, ts, price, size, ifnull(exchange, x'00'), conditions);
CREATE TABLE IF NOT EXISTS quotes (
    symbol TEXT NOT NULL, timestamp INTEGER NOT NULL, bid TEXT, ask TEXT, last TEXT,
    bid_size INTEGER, ask_size INTEGER, volume INTEGER NOT NULL, delayed INTEGER NOT NULL,
    ingested_at INTEGER NOT NULL,
    PRIMARY KEY (symbol, timestamp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS options (
    symbol TEXT NOT NULL, expiry INTEGER NOT NULL, strike TEXT NOT NULL,
    option_type TEXT NOT NULL, ts INTEGER NOT NULL, bid TEXT, ask TEXT, last TEXT,
    volume INTEGER NOT NULL, open_interest INTEGER NOT NULL, implied_volatility TEXT,
    delta TEXT, gamma TEXT, theta TEXT, vega TEXT, delayed INTEGER NOT NULL,
    ingested_at INTEGER NOT NULL,
    PRIMARY KEY (symbol, expiry, strike, option_type, ts)
) WITHOUT ROWID;
"""

_KEY_DECIMALS = {("trades", "price"), ("options", "strike")}


def upsert_sql(spec: KindSpec) -> str:
    """The idempotent insert statement of a kind (also used by the raw benchmark).

    Args:
        spec: the record kind.

    Returns:
        An ``INSERT ... ON CONFLICT`` statement with one ``?`` per column plus
        ``ingested_at``.
    """
    cols = (*spec.columns, "ingested_at")
    head = f"INSERT INTO {spec.table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    if spec.on_conflict == "ignore":
        return head + " ON CONFLICT DO NOTHING"
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in spec.key)
    return f"{head} ON CONFLICT ({', '.join(spec.key)}) DO UPDATE SET {updates}"


def time_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, no float)."""
    td = value - EPOCH
    return (td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds


def key_decimal_text(value: Decimal) -> str:
    """One text per value, as NUMERIC compares in PostgreSQL: ``1.5 == 1.50``, ``-0 == 0``."""
    text = str(value)
    # Fast path: most prices arrive already canonical ("187.25", "100").
    if "E" not in text and not ("." in text and text[-1] == "0") and text != "-0":
        return text
    return format(value.normalize(), "f") if value else "0"


def _opt_str(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


_encode_json = msgspec.json.encode


def _conditions_text(value: tuple[str, ...]) -> str:
    return _encode_json(value).decode()


def _converter(spec: KindSpec) -> Callable[[Row, int], Row]:
    """Compile a function that turns one row into SQLite parameters.

    Written out per kind once at import, so the per-row cost is one call with no
    loop over columns.
    """
    names: dict[str, Any] = {
        "T": time_micros,
        "K": key_decimal_text,
        "D": _opt_str,
        "C": _conditions_text,
    }
    parts = []
    for i, col in enumerate(spec.columns):
        if col in spec.time_columns:
            parts.append(f"T(r[{i}])")
        elif (spec.kind, col) in _KEY_DECIMALS:
            parts.append(f"K(r[{i}])")
        elif col in spec.decimal_columns:
            parts.append(f"D(r[{i}])")
        elif col == "conditions":
            parts.append(f"C(r[{i}])")
        else:
            parts.append(f"r[{i}]")
    source = f"def convert(r, ingested_at):\n    return ({', '.join(parts)}, ingested_at)\n"
    exec(compile(source, f"<sqlite row converter: {spec.kind}>", "exec"), names)
    return names["convert"]  # type: ignore[no-any-return]


_CONVERTERS = {kind: _converter(spec) for kind, spec in KINDS.items()}


def to_sqlite_rows(spec: KindSpec, rows: list[Row], ingested_at: int) -> list[Row]:
    """Turn rows into SQLite parameter tuples (integer times, text Decimals).

    Args:
        spec: the record kind.
        rows: validated rows.
        ingested_at: the commit time, in microseconds since the epoch.

    Returns:
        Parameter tuples for :func:`upsert_sql`.
    """
    convert = _CONVERTERS[spec.kind]
    return [convert(row, ingested_at) for row in rows]


def _from_sqlite(spec: KindSpec, row: tuple[Any, ...]) -> Row:
    out: list[Any] = []
    for col, value in zip(spec.columns, row, strict=True):
        if value is None:
            out.append(None)
        elif col in spec.time_columns:
            out.append(EPOCH + timedelta(microseconds=value))
        elif col in spec.decimal_columns:
            out.append(Decimal(value))
        elif col == "conditions":
            out.append(tuple(msgspec.json.decode(value)))
        elif col == "delayed":
            out.append(bool(value))
        else:
            out.append(value)
    return tuple(out)


class SqliteSink(Sink):
    """Stores rows in a SQLite file.

    Args:
        path: the database file; its folder is created if missing.
        synchronous: the ``synchronous`` pragma (``NORMAL`` or ``FULL``; see settings).
    """

    name = "sqlite"

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._sql = {kind: upsert_sql(spec) for kind, spec in KINDS.items()}

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._executor is None:
            raise SinkError("the SQLite sink is not open", retryable=False)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def open(self) -> None:
        """Open the file (WAL mode) and create or check the schema.

        Raises:
            SinkError: the file cannot be opened or written.
            SchemaError: the file holds a newer schema.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-sink")
        try:
            await self._call(self._open_sync)
        except sqlite3.Error as exc:
            await self.close()
            raise SinkError(f"cannot open SQLite database {self.path}: {exc}") from exc
        except SchemaError:
            await self.close()
            raise

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript("BEGIN IMMEDIATE;" + _DDL)
            found = conn.execute(
                "SELECT value FROM store_meta WHERE key = 'schema_version'"
            ).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(found[0]) > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise SchemaError(
                    f"{self.path} has schema version {found[0]}; this version of "
                    f"store-svc understands up to {SCHEMA_VERSION}. Upgrade store-svc."
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def write(self, batch: Batch) -> None:
        """Commit the batch in one transaction.

        Raises:
            SinkError: nothing was committed (retryable unless the schema is broken).
        """
        try:
            await self._call(lambda: self._write_sync(batch))
        except sqlite3.Error as exc:
            raise SinkError(f"SQLite write failed: {exc}") from exc

    def _write_sync(self, batch: Batch) -> None:
        conn = self._conn
        if conn is None:
            raise SinkError("the SQLite sink is not open", retryable=False)
        ingested_at = time_micros(datetime.now(UTC))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for kind, rows in batch.items():
                if rows:
                    params = to_sqlite_rows(KINDS[kind], list(rows), ingested_at)
                    conn.executemany(self._sql[kind], params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def rows(self, kind: str) -> list[Row]:
        """Every row of ``kind`` in key order."""
        spec = KINDS[kind]

        def read() -> list[Row]:
            assert self._conn is not None
            cur = self._conn.execute(
                f"SELECT {', '.join(spec.columns)} FROM {spec.table} ORDER BY {', '.join(spec.key)}"
            )
            return [_from_sqlite(spec, r) for r in cur.fetchall()]

        return await self._call(read)

    async def counts(self) -> dict[str, int]:
        """Rows per table."""

        def count() -> dict[str, int]:
            assert self._conn is not None
            return {k: self._conn.execute(f"SELECT count(*) FROM {k}").fetchone()[0] for k in KINDS}

        return await self._call(count)

    async def close(self) -> None:
        """Close the connection and stop the worker thread; idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)
