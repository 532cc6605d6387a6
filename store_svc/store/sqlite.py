"""SQLite sink: the embedded default.

One connection, owned by a writer process (``sqlite_worker.py`` tells why it is a
process and not a thread), so no database call runs on the event loop or competes
with it for the GIL. WAL journal, one transaction per batch, idempotent upserts on
the keys of the store layout.

Values are stored losslessly: Decimals as their exact text (the key columns
``trades.price`` and ``options.strike`` in normalised form, so ``1.5`` and ``1.50``
are one key, as in PostgreSQL); times as INTEGER microseconds since the Unix epoch,
UTC (exact, compact and fast to compare; in the sqlite3 shell read them with
``strftime('%Y-%m-%dT%H:%M:%fZ', ts / 1e6, 'unixepoch')``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from store_svc.errors import SchemaError, SinkError
from store_svc.kinds import KINDS, KindSpec, Row
from store_svc.store.base import Batch, Expired, Prepared, Sink
from store_svc.store.codec import EPOCH, compile_converter, time_micros
from store_svc.store.reads import Reader
from store_svc.store.sqlite_process import WorkerProcess
from store_svc.store.sqlite_read import SqliteReader

__all__ = ["SCHEMA_VERSION", "SqliteSink", "column_plan", "upsert_sql"]

#: Bump with every change of the DDL below; a database with a higher number is refused.
SCHEMA_VERSION = 1
#: Seconds the writer process is given to checkpoint and close at shutdown; then it is
#: killed. Nothing committed is lost that way (it is in the WAL, which the next open
#: reads), and a writer stuck on a stalled disk cannot hold up the stop for ever.
WRITER_CLOSE_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)

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
    """The idempotent insert statement of a kind (also the raw-insert benchmark's).

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


def column_plan(spec: KindSpec) -> str:
    """The writer's conversion plan of a kind (``store/codec.py``'s write plans)."""
    codes = []
    for col in spec.columns:
        if col in spec.time_columns:
            codes.append("t")
        elif (spec.kind, col) in _KEY_DECIMALS:
            codes.append("k")
        elif col == "conditions":
            codes.append("c")
        else:
            codes.append("-")
    return "".join(codes)


_PLANS = {kind: column_plan(spec) for kind, spec in KINDS.items()}
# Times are turned into integers here, on the way out: a datetime costs more to send
# and decode than an int, and the writer process is the busier of the two.
_SEND = {
    kind: compile_converter(
        "".join("t" if c == "t" else "-" for c in plan), append_ingested_at=False
    )
    for kind, plan in _PLANS.items()
}
_WRITER_PLANS = {kind: plan.replace("t", "-") for kind, plan in _PLANS.items()}


def _from_sqlite(spec: KindSpec, row: list[Any]) -> Row:
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


class _Sent(Prepared):
    """A batch already sent to the writer process; its reply tells whether it is in."""

    def __init__(self, sink: SqliteSink, reply: asyncio.Future[Any]) -> None:
        self._sink = sink
        self._reply = reply

    async def commit(self) -> None:
        await self._sink._writer.result(self._reply)

    async def abort(self) -> None:
        # A batch handed to the writer cannot be called back; it may still commit
        # (harmless: writes are idempotent). Its reply is just not waited for.
        self._reply.add_done_callback(_ignore_result)


def _ignore_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark it retrieved


def _has_rowid(table: str) -> bool:
    """Whether ``table`` is a rowid table in :data:`_DDL` (not ``WITHOUT ROWID``)."""
    start = _DDL.index(f"CREATE TABLE IF NOT EXISTS {table} (")
    return "WITHOUT ROWID" not in _DDL[start : _DDL.index(";", start)]


def _age_index(spec: KindSpec) -> str:
    """The time index retention's deletes use (only made for kinds with a retention:
    it costs every write)."""
    return (
        f"CREATE INDEX IF NOT EXISTS {spec.table}_{spec.time_column}_age "
        f"ON {spec.table} ({spec.time_column});\n"
    )


class SqliteSink(Sink):
    """Stores rows in a SQLite file, through a writer process of its own.

    The writer is started by :meth:`open` and restarted by the next :meth:`write`
    if it dies; a write in flight when it dies fails with a retryable
    :class:`SinkError`, so the batcher keeps the batch and tries again. Queries
    run in reader processes of their own (:meth:`reader`).

    Args:
        path: the database file; its folder is created if missing.
        synchronous: the ``synchronous`` pragma (``NORMAL`` or ``FULL``; see settings).
        expiring: kinds with a retention: their tables get an index on the time
            column (made at open), which retention's deletes go by.
    """

    name = "sqlite"
    overlaps_writes = True

    def __init__(
        self,
        path: Path,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        expiring: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._writer = WorkerProcess("writer")
        self._lock = asyncio.Lock()
        self._open_arg = {
            "path": str(path),
            "synchronous": synchronous,
            "busy_timeout_ms": busy_timeout_ms,
            "ddl": _DDL + "".join(_age_index(KINDS[kind]) for kind in sorted(expiring)),
            "schema_version": SCHEMA_VERSION,
            "sql": {kind: upsert_sql(spec) for kind, spec in KINDS.items()},
            "select": {
                kind: f"SELECT {', '.join(spec.columns)} FROM {spec.table} "
                f"ORDER BY {', '.join(spec.key)}"
                for kind, spec in KINDS.items()
            },
            "plans": _WRITER_PLANS,
        }

    @property
    def pid(self) -> int | None:
        """Process id of the writer process, while it runs."""
        proc = self._writer.proc
        return proc.pid if proc is not None else None

    async def open(self) -> None:
        """Start the writer process, open the file (WAL) and create or check the schema.

        Raises:
            SinkError: the file cannot be opened or written.
            SchemaError: the file holds a newer schema.
        """
        await self._ensure_writer()

    async def _ensure_writer(self) -> None:
        async with self._lock:
            if not self._writer.running:
                await self._spawn()

    async def _spawn(self) -> None:
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create the folder of {self.path}: {exc}") from exc
        await self._writer.start()
        try:
            await self._writer.call("open", self._open_arg)
        except SchemaError:
            await self._writer.discard()
            raise
        except SinkError as exc:
            await self._writer.discard()
            # Retryable whatever the worker said: a file that cannot be opened now
            # (locked, missing folder, disk full) may open later; the batch waits.
            raise SinkError(f"cannot open SQLite database {self.path}: {exc}") from None
        except BaseException:
            await self._writer.discard()
            raise

    def _wire(self, batch: Batch) -> list[Any]:
        return [
            time_micros(datetime.now(UTC)),
            {kind: [_SEND[kind](r) for r in rows] for kind, rows in batch.items()},
        ]

    async def write(self, batch: Batch) -> None:
        """Commit the batch in one transaction (in the writer process).

        Raises:
            SinkError: nothing was committed; retryable unless the writer reported
                a non-database error.
        """
        await self._ensure_writer()
        await self._writer.call("write", self._wire(batch))

    async def prepare(self, batch: Batch) -> Prepared:
        """Send the batch to the writer now, behind the one it is committing.

        The writer takes it as soon as the batch ahead is done, so it never waits
        between batches; if the batch ahead failed, this one is refused unwritten
        and the batcher writes it again in turn.

        Raises:
            SinkError: the writer is not running.
        """
        await self._ensure_writer()
        return _Sent(self, self._writer.send("write_ahead", self._wire(batch)))

    async def rows(self, kind: str) -> list[Row]:
        """Every row of ``kind`` in key order."""
        spec = KINDS[kind]
        await self._ensure_writer()
        raw = await self._writer.call("rows", kind)
        return [_from_sqlite(spec, r) for r in raw]

    async def expire(self, kind: str, before: datetime, limit: int) -> Expired:
        """Remove up to ``limit`` rows of ``kind`` older than ``before`` (one small
        transaction in the writer). Freed pages are reused by new rows; the file does
        not shrink."""
        spec = KINDS[kind]
        await self._ensure_writer()
        # A rowid table by rowid (the trades key holds a NULL-able exchange, which a
        # key comparison would never match); the WITHOUT ROWID tables by their key.
        key = ["rowid"] if _has_rowid(spec.table) else list(spec.key)
        arg = [spec.table, spec.time_column, key, time_micros(before), limit]
        removed: int = await self._writer.call("expire", arg)
        return Expired(removed, more=removed == limit)

    async def counts(self) -> dict[str, int]:
        """Rows per table."""
        await self._ensure_writer()
        result: dict[str, int] = await self._writer.call("counts", list(KINDS))
        return result

    async def close(self) -> None:
        """Checkpoint, close the file and end the writer process; idempotent."""
        async with self._lock:
            await self._writer.close(WRITER_CLOSE_TIMEOUT_S)

    def reader(self, concurrency: int) -> Reader:
        """Reader processes on read-only connections (WAL: they never block the writer).

        Args:
            concurrency: reader processes, each running one query at a time.
        """
        return SqliteReader(self.path, concurrency, self._busy_timeout_ms)
