"""TimescaleDB for the PostgreSQL sink: whether it can be used, and the four tables as
hypertables with a chunk interval per kind.

TimescaleDB works only when the server preloads it (``shared_preload_libraries``); a
server where it is merely installed ends the session that runs ``CREATE EXTENSION``
with a FATAL. So the server is asked first: the extension's settings exist only in a
server that preloaded it. ``STORE_TIMESCALEDB`` decides what follows (``auto``: use it
when it can be used; ``require``: fail otherwise; ``off``: never).

The tables are made hypertables without TimescaleDB's default time index (no read
needs it: every read is by symbol and time, which the key covers; it cost new-row
writes 8-14 %). A table that already holds rows is converted with ``migrate_data`` on
a connection of its own, with no statement timeout (a big table takes minutes), under
an advisory lock so instances starting together convert it once; :attr:`progress`
says what is under way, for health. A changed chunk interval applies to new chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg

from store_svc.errors import SinkError
from store_svc.kinds import KINDS
from store_svc.settings import format_duration
from store_svc.store.base import Expired
from store_svc.store.postgres_read import DRIVER_ERRORS

__all__ = ["CHUNKS_PER_STEP", "Timescale", "describe", "drop_old_chunks"]

log = logging.getLogger(__name__)

_LOCK_KEY = 0x5354_5453  # "STTS": one instance prepares the hypertables at a time

#: Set only in a server that preloaded TimescaleDB.
_PRELOADED = "SELECT current_setting('timescaledb.max_background_workers', true) IS NOT NULL"

#: How often a long conversion says it is still going.
PROGRESS_EVERY_S = 15.0

#: Chunks one retention step drops at most (each takes locks until the commit).
CHUNKS_PER_STEP = 16

_INSTALLED_HERE = "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"

_warned_not_preloaded = False


def describe(exc: BaseException) -> str:
    """``exc`` in words, never empty (asyncpg's timeouts carry no text)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Timescale:
    """Decides whether to use TimescaleDB and prepares the hypertables.

    Args:
        dsn: the database URL.
        mode: ``STORE_TIMESCALEDB``.
        intervals: chunk interval per kind.
        on_progress: told what is under way (empty string when it is over).
    """

    def __init__(
        self,
        dsn: str,
        mode: Literal["auto", "require", "off"],
        intervals: dict[str, timedelta],
        on_progress: Callable[[str], None],
    ) -> None:
        self._dsn = dsn
        self._mode = mode
        self._intervals = intervals
        self._progress = on_progress
        #: Why the tables are plain (empty when they are hypertables).
        self.plain_because = ""

    async def check_not_orphaned(self, conn: Any) -> None:
        """Refuse a database that has the extension on a server that no longer preloads
        it: any use of its hypertables would end the session with a FATAL.

        Raises:
            SinkError: so (not retryable), saying what to do.
        """
        if await conn.fetchval(_INSTALLED_HERE) and not await conn.fetchval(_PRELOADED):
            raise SinkError(
                "this database has the timescaledb extension, but the server does not "
                "preload it (every use of a hypertable would fail): add timescaledb to "
                "shared_preload_libraries in postgresql.conf and restart, or, if no "
                "table is a hypertable, DROP EXTENSION timescaledb",
                retryable=False,
            )

    async def usable(self, conn: Any) -> bool:
        """Whether TimescaleDB is to be used on this server.

        Raises:
            SinkError: ``require`` and it cannot be used; ``off`` with tables that are
                hypertables already.
        """
        global _warned_not_preloaded
        if self._mode == "off":
            if await conn.fetchval(_INSTALLED_HERE):
                made = await conn.fetchval(
                    "SELECT count(*) FROM timescaledb_information.hypertables "
                    "WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1)",
                    list(KINDS),
                )
                if made:
                    raise SinkError(
                        "STORE_TIMESCALEDB=off, but the tables are TimescaleDB hypertables "
                        "already: set STORE_TIMESCALEDB=auto to use them as such",
                        retryable=False,
                    )
            self.plain_because = "STORE_TIMESCALEDB=off"
            return False
        installed = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        preloaded = bool(await conn.fetchval(_PRELOADED))
        if installed and preloaded:
            return True
        if not installed:
            self.plain_because = "the server has no timescaledb extension"
            hint = "install TimescaleDB on the PostgreSQL server and preload it"
        else:
            self.plain_because = "timescaledb is installed but not preloaded"
            hint = "add timescaledb to shared_preload_libraries in postgresql.conf and restart"
        if self._mode == "require":
            raise SinkError(
                f"STORE_TIMESCALEDB=require, but {self.plain_because}: {hint}",
                retryable=False,
            )
        if installed and not _warned_not_preloaded:
            _warned_not_preloaded = True
            log.warning(
                "%s: the tables stay plain PostgreSQL tables (%s to use it, or set "
                "STORE_TIMESCALEDB=off to silence this)",
                self.plain_because,
                hint,
            )
        return False

    async def prepare(self) -> bool:
        """Create the extension and make each table a hypertable with its interval.

        Returns:
            True; False when ``auto`` may not create the extension (plain tables).

        Raises:
            SinkError: a step failed; the message says which, and what to do.
        """
        try:
            conn = await asyncpg.connect(self._dsn, command_timeout=None)
        except DRIVER_ERRORS as exc:
            raise SinkError(f"cannot connect to PostgreSQL: {describe(exc)}") from exc
        try:
            await conn.execute("SET statement_timeout = 0")
            self._progress("waiting for another instance preparing the hypertables")
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            self._progress("preparing the hypertables")
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            except asyncpg.InsufficientPrivilegeError as exc:
                if self._mode == "require":
                    raise SinkError(
                        f"STORE_TIMESCALEDB=require, but {describe(exc)}: create the "
                        "extension as a superuser (CREATE EXTENSION timescaledb)",
                        retryable=False,
                    ) from exc
                self.plain_because = f"the extension cannot be created ({describe(exc)})"
                log.warning("%s: the tables stay plain PostgreSQL tables", self.plain_because)
                return False
            for kind in KINDS:
                await self._table(conn, kind)
            return True
        except SinkError:
            raise
        except DRIVER_ERRORS as exc:
            raise SinkError(f"cannot prepare the TimescaleDB tables: {describe(exc)}") from exc
        finally:
            self._progress("")
            conn.terminate()  # the advisory lock goes with the session

    async def _table(self, conn: Any, kind: str) -> None:
        spec = KINDS[kind]
        table, column = spec.table, spec.time_column
        wanted = self._intervals[kind]
        current = await conn.fetchval(
            "SELECT time_interval FROM timescaledb_information.dimensions "
            "WHERE hypertable_schema = current_schema() AND hypertable_name = $1 "
            "AND dimension_number = 1",
            table,
        )
        if current is None:
            await self._create(conn, kind)
        elif current != wanted:
            await conn.execute(
                "SELECT set_chunk_time_interval($1::regclass, $2::interval)", table, wanted
            )
            log.info(
                "%s: chunk interval %s -> %s (new chunks; existing ones keep theirs)",
                table,
                format_duration(current),
                format_duration(wanted),
            )
        # TimescaleDB's default time index, made by hypertables of earlier versions.
        default_index = f"{table}_{column}_idx"
        dropped = await conn.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = $1 AND indexname = $2 AND indexdef LIKE $3",
            table,
            default_index,
            f"%({quoted_name(column)} DESC)",
        )
        if dropped:
            await conn.execute(f'DROP INDEX "{default_index}"')
            log.info("%s: dropped TimescaleDB's default time index %s (no read needs it)",
                     table, default_index)  # fmt: skip

    async def _create(self, conn: Any, kind: str) -> None:
        spec = KINDS[kind]
        table, column = spec.table, spec.time_column
        interval = self._intervals[kind]
        create = (
            "SELECT create_hypertable($1::regclass, $2::name, chunk_time_interval => "
            "$3::interval, create_default_indexes => FALSE, migrate_data => TRUE)"
        )
        if not await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            await conn.execute(create, table, column, interval)
            log.info("%s: hypertable on %s, chunks of %s", table, column,
                     format_duration(interval))  # fmt: skip
            return
        rows = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        what = f"converting {table} ({rows:,} rows) into a hypertable"
        log.info("%s: the service takes writes once it is done", what)
        began = time.monotonic()
        ticker = asyncio.create_task(self._tick(what, began))
        try:
            async with conn.transaction():
                await conn.execute(create, table, column, interval)
        except DRIVER_ERRORS as exc:
            raise SinkError(
                f"{what} failed after {time.monotonic() - began:.1f}s ({describe(exc)}); "
                f"nothing was changed. Convert it by hand (psql: SELECT create_hypertable("
                f"'{table}', '{column}', chunk_time_interval => INTERVAL "
                f"'{format_duration(interval)}', create_default_indexes => false, "
                "migrate_data => true);), or set STORE_TIMESCALEDB=off for plain tables",
                retryable=False,
            ) from exc
        finally:
            ticker.cancel()
        log.info("%s: done in %.1fs", what, time.monotonic() - began)

    async def _tick(self, what: str, began: float) -> None:
        said = 0
        while True:
            elapsed = time.monotonic() - began
            self._progress(f"{what}: {elapsed:.0f}s so far")
            if elapsed >= (said + 1) * PROGRESS_EVERY_S:
                said = int(elapsed // PROGRESS_EVERY_S)
                log.info("%s: still going, %.0fs so far", what, elapsed)
            await asyncio.sleep(1.0)


def quoted_name(column: str) -> str:
    """``column`` as ``pg_indexes.indexdef`` writes it (quoted only when it must be)."""
    return f'"{column}"' if column in ("timestamp",) else column


async def drop_old_chunks(pool: Any, table: str, before: datetime) -> Expired:
    """Drop the oldest :data:`CHUNKS_PER_STEP` chunks of ``table`` lying wholly before
    ``before``, and count their rows (from statistics, exactly where there are none)."""
    async with pool.acquire() as conn:
        chunks = await conn.fetch(
            "SELECT format('%I.%I', chunk_schema, chunk_name) AS chunk, range_end "
            "FROM timescaledb_information.chunks WHERE hypertable_schema = current_schema() "
            "AND hypertable_name = $1 AND range_end <= $2 ORDER BY range_end LIMIT $3",
            table,
            before,
            CHUNKS_PER_STEP + 1,
        )
        step = chunks[:CHUNKS_PER_STEP]
        if not step:
            return Expired(0, more=False)
        rows = 0
        for chunk in step:
            estimate = await conn.fetchval(
                "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", chunk["chunk"]
            )
            if estimate is None or estimate < 0:  # never analysed: count it
                estimate = await conn.fetchval(f"SELECT count(*) FROM {chunk['chunk']}")
            rows += int(estimate)
        await conn.execute(
            "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)",
            table,
            step[-1]["range_end"],
        )
    log.info("retention: dropped %d %s chunks (about %d rows)", len(step), table, rows)
    return Expired(rows, more=len(chunks) > CHUNKS_PER_STEP)
