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
from datetime import timedelta
from typing import Any, Literal

import asyncpg

from store_svc.errors import SinkError
from store_svc.kinds import KINDS
from store_svc.settings import format_duration
from store_svc.store.postgres_read import DRIVER_ERRORS

__all__ = ["Timescale", "describe"]

log = logging.getLogger(__name__)

_LOCK_KEY = 0x5354_5453  # "STTS": one instance prepares the hypertables at a time

#: Set only in a server that preloaded TimescaleDB.
_PRELOADED = "SELECT current_setting('timescaledb.max_background_workers', true) IS NOT NULL"

#: How often a long conversion says it is still going.
PROGRESS_EVERY_S = 15.0

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

    async def usable(self, conn: Any) -> bool:
        """Whether TimescaleDB is to be used on this server.

        Raises:
            SinkError: ``require`` and it cannot be used.
        """
        global _warned_not_preloaded
        if self._mode == "off":
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

    async def prepare(self) -> None:
        """Create the extension and make each table a hypertable with its interval.

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
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            for kind in KINDS:
                await self._table(conn, kind)
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
            "AND tablename = $1 AND indexname = $2",
            table,
            default_index,
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
