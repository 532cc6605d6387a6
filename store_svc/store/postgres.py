"""PostgreSQL / TimescaleDB sink, through asyncpg.

Each flush runs in one transaction: per kind, the rows are copied into a temporary
staging table (``copy_records_to_table``, binary COPY) and merged into the target
with ``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT``. ``DISTINCT ON`` keeps
one row per key inside the batch, since PostgreSQL refuses to update a row twice in
one statement: the last one for kinds whose later writes win (bars, quotes,
options), the first for trades. NUMERIC holds Decimals exactly, ``timestamptz``
the times, ``text[]`` the trade conditions; the trades key treats a NULL exchange
as a value (``NULLS NOT DISTINCT``, PostgreSQL 15+).

Two writer connections take turns: while one batch merges and commits, the next
is copied into staging on the other; the batcher commits them in order.

The schema is versioned in ``store_meta``; it is created or checked at start-up
under an advisory lock, so instances starting together do not race. Whether the
four tables become TimescaleDB hypertables is ``STORE_TIMESCALEDB``'s to decide (see
:mod:`store_svc.store.timescale`); plain PostgreSQL works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from store_svc.errors import SchemaError, SinkError
from store_svc.kinds import KINDS, KindSpec, Row
from store_svc.settings import Settings
from store_svc.store.base import Batch, Expired, Prepared, Sink
from store_svc.store.codec import compile_converter
from store_svc.store.postgres_read import DRIVER_ERRORS, PostgresReader, quoted
from store_svc.store.reads import Reader
from store_svc.store.timescale import Timescale, describe, drop_old_chunks

__all__ = ["SCHEMA_VERSION", "PostgresSink", "merge_sql", "staging_records"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_LOCK_KEY = 0x5354_4F52  # "STOR": the advisory lock that serialises schema changes
_RETENTION_KEY = 0x5354_5245  # "STRE": the instance whose turn it is to run retention

_DDL = """
CREATE TABLE IF NOT EXISTS store_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS bars (
    symbol text NOT NULL, resolution text NOT NULL, ts timestamptz NOT NULL,
    open numeric NOT NULL, high numeric NOT NULL, low numeric NOT NULL,
    close numeric NOT NULL, volume numeric NOT NULL, delayed boolean NOT NULL,
    ingested_at timestamptz NOT NULL,
    PRIMARY KEY (symbol, resolution, ts)
);
CREATE TABLE IF NOT EXISTS trades (
    symbol text NOT NULL, ts timestamptz NOT NULL, price numeric NOT NULL,
    size bigint NOT NULL, exchange text, conditions text[] NOT NULL,
    ingested_at timestamptz NOT NULL,
    CONSTRAINT trades_key UNIQUE NULLS NOT DISTINCT (symbol, ts, price, size, exchange, conditions)
);
CREATE TABLE IF NOT EXISTS quotes (
    symbol text NOT NULL, "timestamp" timestamptz NOT NULL, bid numeric, ask numeric,
    last numeric, bid_size bigint, ask_size bigint, volume bigint NOT NULL,
    delayed boolean NOT NULL, ingested_at timestamptz NOT NULL,
    PRIMARY KEY (symbol, "timestamp")
);
CREATE TABLE IF NOT EXISTS options (
    symbol text NOT NULL, expiry timestamptz NOT NULL, strike numeric NOT NULL,
    option_type text NOT NULL, ts timestamptz NOT NULL, bid numeric, ask numeric,
    last numeric, volume bigint NOT NULL, open_interest bigint NOT NULL,
    implied_volatility numeric, delta numeric, gamma numeric, theta numeric,
    vega numeric, delayed boolean NOT NULL, ingested_at timestamptz NOT NULL,
    PRIMARY KEY (symbol, expiry, strike, option_type, ts)
);
"""


def merge_sql(spec: KindSpec) -> tuple[str, str]:
    """The staging DDL and the merge statement of a kind.

    Args:
        spec: the record kind.

    Returns:
        ``(create_staging, merge)``. The staging table is ``stage_<kind>`` with the
        kind's record columns, times as ``bigint`` microseconds since the Unix epoch
        (asyncpg encodes an int several times faster than a datetime, and the
        encoding runs on the event loop) and Decimals as their exact ``text``
        (asyncpg's binary ``numeric`` encoding took 7-10 µs per bar row of five
        Decimals, the text 1.5-2; the server's cast costs it about 0.3 µs a value),
        plus ``seq``, the row's position in the batch. The merge turns both back
        exactly and sets ``ingested_at`` to the transaction's time.
    """
    columns = ", ".join(_staged_column(spec, c) for c in spec.columns)
    create = (
        f"CREATE TEMP TABLE IF NOT EXISTS stage_{spec.kind} ON COMMIT DELETE ROWS AS "
        f"SELECT {columns}, 0::bigint AS seq FROM {spec.table} WITH NO DATA"
    )
    values = ", ".join(_merged_value(spec, c) for c in spec.columns)
    key = ", ".join(quoted(c) for c in spec.key)
    targets = [*spec.columns, "ingested_at"]
    collist = ", ".join(quoted(c) for c in targets)
    if spec.on_conflict == "ignore":
        # No sort needed: DO NOTHING skips a second row with the same key within the
        # statement too, and the staging table is read in the order it was filled.
        select = f"SELECT {values}, now() FROM stage_{spec.kind}"
        conflict = "ON CONFLICT DO NOTHING"
    else:
        # The key as the table compares it: a Decimal key column by its numeric
        # value (its text may differ, as 200 and 200.0 do), so two staged rows that
        # are one key in the table are one here too.
        staged_key = ", ".join(
            _merged_value(spec, c) if c in spec.decimal_columns else quoted(c) for c in spec.key
        )
        select = (
            f"SELECT DISTINCT ON ({staged_key}) {values}, now() FROM stage_{spec.kind} "
            f"ORDER BY {staged_key}, seq DESC"
        )
        updates = ", ".join(
            f"{quoted(c)} = EXCLUDED.{quoted(c)}" for c in targets if c not in spec.key
        )
        conflict = f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    return create, f"INSERT INTO {spec.table} ({collist}) {select} {conflict}"


def _staged_column(spec: KindSpec, column: str) -> str:
    """A staging column: times as ``bigint`` µs, Decimals as ``text``, the rest as is."""
    if column in spec.time_columns:
        return f"0::bigint AS {quoted(column)}"
    if column in spec.decimal_columns:
        return f"NULL::text AS {quoted(column)}"
    return quoted(column)


def _merged_value(spec: KindSpec, column: str) -> str:
    """How the merge reads a staging column back into the table's type, exactly."""
    if column in spec.time_columns:
        return f"timestamptz 'epoch' + {quoted(column)} * interval '1 microsecond'"
    if column in spec.decimal_columns:
        return f"{quoted(column)}::numeric"
    return quoted(column)


def _staging_converter(spec: KindSpec) -> Callable[[Row, int], tuple[Any, ...]]:
    plan = "".join(
        "t" if c in spec.time_columns else "d" if c in spec.decimal_columns else "-"
        for c in spec.columns
    )
    return compile_converter(plan)


_TO_STAGE = {kind: _staging_converter(spec) for kind, spec in KINDS.items()}


def staging_records(kind: str, rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    """The records COPY sends to ``stage_<kind>``: times as µs ints, then ``seq``.

    Args:
        kind: the record kind.
        rows: the batch's rows of that kind, in arrival order.

    Returns:
        One tuple per row, in the staging table's column order.
    """
    convert = _TO_STAGE[kind]
    return [convert(row, seq) for seq, row in enumerate(rows)]


#: Errors about the data, not the server: client-side encoding errors and SQL
#: classes 22 (data exception) and 23 (integrity constraint violation).
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    OverflowError,
)


def _sink_error(exc: BaseException) -> BaseException:
    """The SinkError for a failed write (other exceptions, e.g. cancellation, as they are)."""
    if isinstance(exc, _REFUSED):
        # The data itself is refused (bad value, constraint): retrying cannot help.
        return SinkError(
            f"PostgreSQL refused the data: {type(exc).__name__}: {exc}", retryable=False
        )
    if isinstance(exc, DRIVER_ERRORS):
        return SinkError(f"PostgreSQL write failed: {type(exc).__name__}: {exc}")
    return exc


class _Staged(Prepared):
    """A batch in the staging tables of an open transaction, waiting to merge."""

    def __init__(
        self, sink: PostgresSink, conn: asyncpg.Connection, tx: Any, kinds: list[str]
    ) -> None:
        self._sink = sink
        self._conn: asyncpg.Connection | None = conn
        self._tx = tx
        self._kinds = kinds

    async def commit(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            raise SinkError("this staged batch was already committed or given up")
        try:
            for kind in self._kinds:
                await conn.execute(self._sink._sql[kind][1])
            await self._tx.commit()
        except BaseException as exc:
            self._sink._drop(conn)
            err = _sink_error(exc)
            if err is exc:
                raise
            raise err from exc
        self._sink._release(conn)

    async def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._sink._drop(conn)  # the server rolls the transaction back


class PostgresSink(Sink):
    """Stores rows in PostgreSQL (optionally TimescaleDB).

    Args:
        dsn: a ``postgresql://`` URL.
        pool_size: most connections kept open.
        timescaledb: ``STORE_TIMESCALEDB`` (``auto``, ``require``, ``off``).
        chunk_intervals: TimescaleDB chunk interval per kind (default: the settings').
        command_timeout_s: the statement timeout of the pool's and the writers'
            connections (a hypertable conversion has none).
        expiring: kinds with a retention: as plain tables they get a BRIN index on
            the time column (small, nearly free to keep), which retention's deletes
            go by; hypertables drop whole chunks instead.
    """

    name = "postgresql"
    overlaps_writes = True

    def __init__(
        self,
        dsn: str,
        pool_size: int = 4,
        *,
        timescaledb: Literal["auto", "require", "off"] = "auto",
        chunk_intervals: dict[str, timedelta] | None = None,
        command_timeout_s: float = 60.0,
        expiring: frozenset[str] = frozenset(),
    ) -> None:
        self._expiring = expiring
        self.dsn = dsn
        self._pool_size = pool_size
        self._timeout = command_timeout_s
        intervals = chunk_intervals or Settings.model_construct().chunk_intervals
        self._ts = Timescale(dsn, timescaledb, intervals, self._set_progress)
        self._pool: asyncpg.Pool | None = None
        self._writers: set[asyncpg.Connection] = set()
        self._idle: list[asyncpg.Connection] = []
        self._sql = {kind: merge_sql(spec) for kind, spec in KINDS.items()}
        self.timescale = False

    async def open(self) -> None:
        """Connect and create or check the schema.

        Raises:
            SinkError: the server cannot be reached or used.
            SchemaError: the database holds a newer schema than this version knows.
        """
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self._pool_size, command_timeout=self._timeout
            )
        except DRIVER_ERRORS as exc:
            raise SinkError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc
        try:
            async with pool.acquire() as conn:
                # Hypertables of a database whose server no longer preloads TimescaleDB
                # end every session that touches them with a FATAL: say so first.
                await self._ts.check_not_orphaned(conn)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await conn.execute(_DDL)
                found = await conn.fetchval(
                    "SELECT value FROM store_meta WHERE key = 'schema_version'"
                )
                if found is None:
                    await conn.execute(
                        "INSERT INTO store_meta (key, value) VALUES ('schema_version', $1)",
                        str(SCHEMA_VERSION),
                    )
                elif int(found) > SCHEMA_VERSION:
                    raise SchemaError(
                        f"the database has schema version {found}; this version of store-svc "
                        f"understands up to {SCHEMA_VERSION}. Upgrade store-svc."
                    )
                use = await self._ts.usable(conn)
            if use:
                # Outside the schema transaction and its timeout: a conversion of a big
                # table takes minutes.
                use = await self._ts.prepare()
            elif self._expiring:
                await self._age_indexes()
            self.timescale = use
        except SinkError:
            await pool.close()
            raise
        except DRIVER_ERRORS as exc:
            await pool.close()
            raise SinkError(f"cannot prepare the PostgreSQL schema: {describe(exc)}") from exc
        except BaseException:
            await pool.close()  # cancelled (a stop during a long conversion)
            raise
        self._pool = pool
        if use:
            log.info("TimescaleDB: the tables are hypertables")

    async def _age_indexes(self) -> None:
        """BRIN indexes on the time column of plain tables with a retention (built
        outside the schema transaction's timeout: a big table takes a while)."""
        conn = await asyncpg.connect(self.dsn, command_timeout=None)
        try:
            await conn.execute("SET statement_timeout = 0")
            # Instances starting together: CREATE INDEX IF NOT EXISTS is not race-safe.
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            for kind in sorted(self._expiring):
                spec = KINDS[kind]
                column = quoted(spec.time_column)
                self.progress = f"indexing {spec.table} by time for retention"
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {spec.table}_{spec.time_column}_age "
                    f"ON {spec.table} USING brin ({column})"
                )
        finally:
            self.progress = ""
            await conn.close()

    async def expire(self, kind: str, before: datetime, limit: int) -> Expired:
        """Remove rows of ``kind`` older than ``before``: up to ``limit`` of a plain
        table in one short transaction; of a hypertable, the oldest
        ``CHUNKS_PER_STEP`` chunks that lie wholly before ``before``."""
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        spec = KINDS[kind]
        try:
            if self.timescale:
                return await drop_old_chunks(pool, spec.table, before)
            column = quoted(spec.time_column)
            # By (tableoid, ctid): a ctid alone names a row only within one table.
            status = await pool.execute(
                f"WITH doomed AS (SELECT tableoid, ctid FROM {spec.table} "
                f"WHERE {column} < $1 LIMIT $2) DELETE FROM {spec.table} t USING doomed d "
                "WHERE t.tableoid = d.tableoid AND t.ctid = d.ctid",
                before,
                limit,
            )
        except DRIVER_ERRORS as exc:
            raise SinkError(f"retention on {spec.table} failed: {describe(exc)}") from exc
        removed = int(status.rsplit(" ", 1)[-1])
        return Expired(removed, more=removed == limit)

    @contextlib.asynccontextmanager
    async def retention_turn(self) -> AsyncIterator[bool]:
        """One instance per database runs a pass: the one holding an advisory lock."""
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        try:
            conn = await pool.acquire()
        except DRIVER_ERRORS as exc:
            raise SinkError(f"retention: {describe(exc)}") from exc
        try:
            try:
                mine = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RETENTION_KEY))
            except DRIVER_ERRORS as exc:
                raise SinkError(f"retention: {describe(exc)}") from exc
            try:
                yield mine
            finally:
                if mine:
                    with contextlib.suppress(*DRIVER_ERRORS):
                        await conn.execute("SELECT pg_advisory_unlock($1)", _RETENTION_KEY)
        finally:
            await pool.release(conn)

    def _set_progress(self, what: str) -> None:
        self.progress = what

    def details(self) -> dict[str, str]:
        """The layout in use: ``hypertables`` or ``plain`` (and why plain)."""
        if self.timescale:
            return {"layout": "hypertables"}
        because = self._ts.plain_because
        return {"layout": "plain", **({"timescaledb": because} if because else {})}

    async def write(self, batch: Batch) -> None:
        """Copy and merge the batch in one transaction.

        Raises:
            SinkError: nothing was committed (retryable: connection lost, server down).
        """
        prepared = await self.prepare(batch)
        await prepared.commit()

    async def prepare(self, batch: Batch) -> _Staged:
        """Open a transaction on a free writer connection and COPY the batch into staging.

        The merge runs in :meth:`_Staged.commit`; meanwhile the batch ahead can merge
        and commit on the other connection.

        Raises:
            SinkError: nothing is held (retryable unless the data was refused).
        """
        if self._pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._acquire()
            tx = conn.transaction()
            await tx.start()
            kinds = []
            for kind, rows in batch.items():
                if not rows:
                    continue
                await conn.copy_records_to_table(
                    f"stage_{kind}", records=staging_records(kind, rows)
                )
                kinds.append(kind)
        except BaseException as exc:
            if conn is not None:
                self._drop(conn)  # a COPY cut short may leave the session unusable
            err = _sink_error(exc)
            if err is exc:
                raise
            raise err from exc
        return _Staged(self, conn, tx, kinds)

    async def _acquire(self) -> asyncpg.Connection:
        # Writer connections live outside the pool, with their staging tables made
        # once: no pool reset and no DDL round trip per batch. Two are in use while
        # one batch merges and the next is staged.
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._writers.discard(conn)
        conn = await asyncpg.connect(self.dsn, command_timeout=self._timeout)
        try:
            for create, _ in self._sql.values():
                await conn.execute(create)
        except BaseException:
            conn.terminate()
            raise
        self._writers.add(conn)
        return conn

    def _release(self, conn: asyncpg.Connection) -> None:
        if conn in self._writers:
            self._idle.append(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        self._writers.discard(conn)
        conn.terminate()

    async def rows(self, kind: str) -> list[Row]:
        """Every row of ``kind`` in key order."""
        spec = KINDS[kind]
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        records = await pool.fetch(
            f"SELECT {', '.join(quoted(c) for c in spec.columns)} FROM {spec.table} "
            f"ORDER BY {', '.join(quoted(c) for c in spec.key)}"
        )
        out: list[Row] = []
        for rec in records:
            values = list(rec)
            if kind == "trades":
                values[spec.columns.index("conditions")] = tuple(
                    values[spec.columns.index("conditions")]
                )
            out.append(tuple(values))
        return out

    async def counts(self) -> dict[str, int]:
        """Rows per table."""
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        return {k: int(await pool.fetchval(f"SELECT count(*) FROM {k}")) for k in KINDS}

    async def close(self) -> None:
        """Close the writer connections and the pool; idempotent."""
        writers, self._writers, self._idle = self._writers, set(), []

        async def close_writer(conn: Any) -> None:
            try:
                await conn.close(timeout=5)
            except (*DRIVER_ERRORS, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

        await asyncio.gather(*(close_writer(c) for c in writers))  # at once: 5 s in all
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                # Graceful close waits for every connection to be released: bounded.
                async with asyncio.timeout(5):
                    await pool.close()
            except TimeoutError:
                log.warning("the PostgreSQL pool did not close within 5 s; terminated")
                pool.terminate()

    def reader(self, concurrency: int) -> Reader:
        """A pool of read-only connections of its own (the writers' are never used).

        Args:
            concurrency: connections, each running one query at a time.
        """
        return PostgresReader(self.dsn, concurrency)
