"""PostgreSQL / TimescaleDB sink, through asyncpg.

Each flush runs in one transaction: per kind, the rows are copied into a temporary
staging table (``copy_records_to_table``, binary COPY) and merged into the target
with ``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT``. ``DISTINCT ON`` keeps
one row per key inside the batch, since PostgreSQL refuses to update a row twice in
one statement: the last one for kinds whose later writes win (bars, quotes,
options), the first for trades. NUMERIC holds Decimals exactly, ``timestamptz``
the times, ``text[]`` the trade conditions; the trades key treats a NULL exchange
as a value (``NULLS NOT DISTINCT``, PostgreSQL 15+).

The schema is versioned in ``store_meta``; it is created or checked at start-up
under an advisory lock, so instances starting together do not race. When the
``timescaledb`` extension is available the four tables become hypertables on their
time column; plain PostgreSQL works without it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ..errors import SchemaError, SinkError
from ..records import KINDS, KindSpec, Row
from .base import Batch, Sink

__all__ = ["SCHEMA_VERSION", "PostgresSink"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_LOCK_KEY = 0x5354_4F52  # "STOR": the advisory lock that serialises schema changes

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

_TIME_COLUMN = {"bars": "ts", "trades": "ts", "quotes": "timestamp", "options": "ts"}


def _q(name: str) -> str:
    return f'"{name}"'


def merge_sql(spec: KindSpec) -> tuple[str, str]:
    """The staging DDL and the merge statement of a kind.

    Args:
        spec: the record kind.

    Returns:
        ``(create_staging, merge)``; the staging table is ``stage_<kind>`` with the
        target's columns plus ``seq`` (the row's position in the batch).
    """
    cols = [*spec.columns, "ingested_at"]
    collist = ", ".join(_q(c) for c in cols)
    key = ", ".join(_q(c) for c in spec.key)
    create = (
        f"CREATE TEMP TABLE IF NOT EXISTS stage_{spec.kind} "
        f"(LIKE {spec.table} INCLUDING DEFAULTS, seq bigint NOT NULL) ON COMMIT DELETE ROWS"
    )
    order = "seq DESC" if spec.on_conflict == "update" else "seq"
    select = f"SELECT DISTINCT ON ({key}) {collist} FROM stage_{spec.kind} ORDER BY {key}, {order}"
    if spec.on_conflict == "ignore":
        conflict = "ON CONFLICT DO NOTHING"
    else:
        updates = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in cols if c not in spec.key)
        conflict = f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    return create, f"INSERT INTO {spec.table} ({collist}) {select} {conflict}"


_RETRYABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
#: Errors about the data, not the server: client-side encoding errors and SQL
#: classes 22 (data exception) and 23 (integrity constraint violation).
_REFUSED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    OverflowError,
)


class PostgresSink(Sink):
    """Stores rows in PostgreSQL (optionally TimescaleDB).

    Args:
        dsn: a ``postgresql://`` URL.
        pool_size: most connections kept open.
    """

    name = "postgresql"

    def __init__(self, dsn: str, pool_size: int = 4) -> None:
        self.dsn = dsn
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
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
                self.dsn, min_size=1, max_size=self._pool_size, command_timeout=60
            )
        except _RETRYABLE as exc:
            raise SinkError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
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
                self.timescale = await self._hypertables(conn)
        except SchemaError:
            await pool.close()
            raise
        except _RETRYABLE as exc:
            await pool.close()
            raise SinkError(f"cannot prepare the PostgreSQL schema: {exc}") from exc
        self._pool = pool

    @staticmethod
    async def _hypertables(conn: Any) -> bool:
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        if not available:
            return False
        try:
            async with conn.transaction():  # a savepoint: a refusal keeps plain tables
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            log.warning("timescaledb is installed but cannot be enabled (%s); plain tables", exc)
            return False
        for table, column in _TIME_COLUMN.items():
            await conn.execute(
                "SELECT create_hypertable($1::regclass, $2::name, if_not_exists => TRUE, "
                "migrate_data => TRUE)",
                table,
                column,
            )
        log.info("TimescaleDB found: tables are hypertables")
        return True

    async def write(self, batch: Batch) -> None:
        """Copy and merge the batch in one transaction.

        Raises:
            SinkError: nothing was committed (retryable: connection lost, server down).
        """
        if self._pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        now = datetime.now(UTC)
        try:
            conn = await self._writer_connection()
            async with conn.transaction():
                for kind, rows in batch.items():
                    if not rows:
                        continue
                    spec = KINDS[kind]
                    await conn.copy_records_to_table(
                        f"stage_{kind}",
                        records=[(*row, now, i) for i, row in enumerate(rows)],
                        columns=[*spec.columns, "ingested_at", "seq"],
                    )
                    await conn.execute(self._sql[kind][1])
        except _REFUSED as exc:
            # The data itself is refused (bad value, constraint): retrying cannot help.
            await self._drop_writer()  # a COPY cut short may leave the session unusable
            raise SinkError(
                f"PostgreSQL refused the data: {type(exc).__name__}: {exc}", retryable=False
            ) from exc
        except _RETRYABLE as exc:
            await self._drop_writer()  # reconnect on the next attempt
            raise SinkError(f"PostgreSQL write failed: {type(exc).__name__}: {exc}") from exc

    async def _writer_connection(self) -> asyncpg.Connection:
        # One connection for all writes (there is one writer), with the staging
        # tables made once: no pool reset and no DDL round trip per batch.
        if self._writer is None or self._writer.is_closed():
            conn = await asyncpg.connect(self.dsn, command_timeout=60)
            try:
                for create, _ in self._sql.values():
                    await conn.execute(create)
            except BaseException:
                await conn.close()
                raise
            self._writer = conn
        return self._writer

    async def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            conn.terminate()

    async def rows(self, kind: str) -> list[Row]:
        """Every row of ``kind`` in key order."""
        spec = KINDS[kind]
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not open")
        records = await pool.fetch(
            f"SELECT {', '.join(_q(c) for c in spec.columns)} FROM {spec.table} "
            f"ORDER BY {', '.join(_q(c) for c in spec.key)}"
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
        """Close the writer connection and the pool; idempotent."""
        conn, self._writer = self._writer, None
        if conn is not None:
            try:
                await conn.close(timeout=5)
            except (*_RETRYABLE, asyncpg.InterfaceError):
                conn.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
