"""Queries on PostgreSQL: the read plans as SQL, run on a read-only pool of their own.

Each symbol is read on its own (a lateral subquery over the table key's index) and
the per-symbol pages merged, so a page costs about ``limit`` x symbols rows however
long the range. Rows are encoded on the event loop (asyncpg hands them over there);
the page size and reply budget bound that work per query.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from store_svc.errors import QueryTimeout, SinkError
from store_svc.kinds import KINDS, KindSpec
from store_svc.store.codec import EPOCH, collect_page, compile_readout, encoder_for, time_micros
from store_svc.store.reads import KEY_TIMES, LatestPlan, Page, PagePlan, Reader, core_fields

__all__ = ["DRIVER_ERRORS", "PostgresReader", "latest_sql", "page_sql", "quoted"]

#: What asyncpg raises when the server or the connection fails (not a bug of ours).
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def quoted(name: str) -> str:
    """A column name as a quoted SQL identifier."""
    return f'"{name}"'


#: The sort key (see ``KEY_TYPES``) as PostgreSQL expressions: text in the "C"
#: collation (UTF-8 byte order, as SQLite), key NUMERICs as their canonical text
#: (``trim_scale``), conditions as their compact JSON text. So the order is the
#: SQLite sink's, whatever the database's collation.
_SORT = {
    "bars": ("ts", 'symbol COLLATE "C"', 'resolution COLLATE "C"'),
    "trades": (
        "ts",
        'symbol COLLATE "C"',
        'trim_scale(price)::text COLLATE "C"',
        "size",
        "(exchange IS NOT NULL)::int",
        "coalesce(exchange, '') COLLATE \"C\"",
        'array_to_json(conditions)::text COLLATE "C"',
    ),
    "quotes": ('"timestamp"', 'symbol COLLATE "C"'),
    "options": (
        "ts",
        'symbol COLLATE "C"',
        "expiry",
        'trim_scale(strike)::text COLLATE "C"',
        'option_type COLLATE "C"',
    ),
}


def _from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def page_sql(plan: PagePlan) -> tuple[str, list[Any]]:
    """The PostgreSQL statement of one query page: ``limit + 1`` rows, record
    columns then the sort key.

    Each symbol is read on its own (a lateral subquery: the table key's index gives
    its rows in time order, so only ties are sorted and it stops after ``limit + 1``)
    and the per-symbol pages are merged. A page costs about ``limit`` x symbols rows
    however long the range, instead of sorting the whole rest of the range.

    Args:
        plan: the validated page request.

    Returns:
        The statement and its parameters.
    """
    spec = KINDS[plan.kind]
    key = _SORT[plan.kind]
    when = quoted(spec.time_column)
    params: list[Any] = [list(plan.symbols)]
    where = ["symbol = s.sym"]

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if plan.resolution is not None:
        where.append(f"resolution = {param(plan.resolution)}")
    if plan.start is not None:
        where.append(f"{when} >= {param(_from_micros(plan.start))}")
    if plan.end is not None:
        where.append(f"{when} < {param(_from_micros(plan.end))}")
    past, way = ("<", " DESC") if plan.descending else (">", "")
    if plan.after is not None:
        after: list[Any] = list(plan.after)
        for i in KEY_TIMES[plan.kind]:
            after[i] = _from_micros(int(after[i]))
        # The first condition is implied by the second; it lets the index seek.
        where.append(f"{when} {past}= {param(after[0])}")
        where.append(f"({', '.join(key)}) {past} ({', '.join(param(v) for v in after)})")
    limit = param(plan.limit + 1)
    named = ", ".join(f"{expr} AS k{i}" for i, expr in enumerate(key))
    merged = ", ".join(
        f'k{i} COLLATE "C"{way}' if 'COLLATE "C"' in expr else f"k{i}{way}"
        for i, expr in enumerate(key)
    )
    sql = (
        "SELECT r.* FROM unnest($1::text[]) AS s(sym) CROSS JOIN LATERAL ("
        f"SELECT {', '.join(quoted(c) for c in spec.columns)}, {named} FROM {spec.table} "
        f"WHERE {' AND '.join(where)} ORDER BY {', '.join(k + way for k in key)} "
        f"LIMIT {limit}) AS r ORDER BY {merged} LIMIT {limit}"
    )
    return sql, params


def latest_sql(plan: LatestPlan) -> tuple[str, list[Any]]:
    """One PostgreSQL statement for the latest record(s) of every symbol.

    Args:
        plan: the validated lookup.

    Returns:
        The statement (rows in the plan's symbol order) and its parameters.
    """
    spec = KINDS[plan.kind]
    cols = ", ".join(quoted(c) for c in spec.columns)
    params: list[Any] = [list(plan.symbols)]
    if plan.kind == "bars" and plan.resolution is None:
        inner = (
            f'SELECT DISTINCT ON (resolution COLLATE "C") {cols} FROM bars '
            'WHERE symbol = s.sym ORDER BY resolution COLLATE "C", ts DESC'
        )
        tail = ', r.resolution COLLATE "C"'
    else:
        where = "symbol = s.sym"
        if plan.resolution is not None:
            params.append(plan.resolution)
            where += " AND resolution = $2"
        order = ", ".join(f"{k} DESC" for k in _SORT[plan.kind])
        inner = f"SELECT {cols} FROM {spec.table} WHERE {where} ORDER BY {order} LIMIT 1"
        tail = ""
    sql = (
        "SELECT r.* FROM unnest($1::text[]) WITH ORDINALITY AS s(sym, n) "
        f"CROSS JOIN LATERAL ({inner}) AS r ORDER BY s.n{tail}"
    )
    return sql, params


#: Session settings of the read connections. Every read is a key-range lookup that
#: wants the table key's index in order (then a LIMIT stops it early). Right after
#: a bulk load, before autovacuum has analysed the table, the planner thinks the
#: range holds a handful of rows and picks a bitmap scan, which reads the whole
#: range and sorts it: 50-100 ms a page instead of 3-6 ms (measured on 400,000
#: trades, EXPLAIN ANALYZE). Without bitmap scans the ordered index scan is the
#: only cheap plan, whatever the statistics say. JIT compilation costs more than
#: these short queries take.
_READ_SETTINGS = {"default_transaction_read_only": "on", "enable_bitmapscan": "off", "jit": "off"}
#: How long opening a read connection may take (a query's deadline may cut it shorter).
_CONNECT_TIMEOUT_S = 10.0
#: How long closing the read pool may wait for queries under way before dropping them.
_CLOSE_TIMEOUT_S = 2.0


def _readout_fields(spec: KindSpec) -> list[list[Any]]:
    return [
        [name, spec.columns.index(name), "t" if name in spec.time_columns else "-"]
        for name in core_fields(spec.kind)
    ]


class PostgresReader(Reader):
    """Runs queries on a pool of read-only connections, opened on first use.

    Rows are encoded on the event loop (asyncpg hands them over there); the page
    size and reply budget bound that work per query.

    Args:
        dsn: the PostgreSQL URL.
        concurrency: pool size.
    """

    def __init__(self, dsn: str, concurrency: int) -> None:
        self._dsn = dsn
        self._size = concurrency
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._readout = {kind: compile_readout(_readout_fields(s)) for kind, s in KINDS.items()}

    async def open(self) -> None:
        """Open the pool (one connection; more as queries need them)."""
        await self._pool_now()

    async def _pool_now(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self._size,
                        timeout=_CONNECT_TIMEOUT_S,
                        server_settings=_READ_SETTINGS,
                    )
                except (TimeoutError, *DRIVER_ERRORS) as exc:
                    raise SinkError(f"cannot connect to PostgreSQL for queries: {exc}") from exc
            return self._pool

    async def _fetch(self, sql: str, params: list[Any], timeout: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # Opening the pool, waiting for a free connection: all within the deadline.
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                pool = await self._pool_now()
                conn = await pool.acquire()
        except TimeoutError:
            raise QueryTimeout(
                "no query connection could be had before the deadline (all busy, or "
                "PostgreSQL slow to accept one)"
            ) from None
        except DRIVER_ERRORS as exc:
            raise SinkError(f"cannot reach PostgreSQL for queries: {exc}") from exc
        try:
            return list(await conn.fetch(sql, *params, timeout=max(0.001, deadline - loop.time())))
        except (TimeoutError, asyncpg.QueryCanceledError):
            # Past the deadline the connection is dropped rather than cancelled and
            # reset: a release would wait for the server to acknowledge the cancel,
            # which a stuck server never does, and the 504 would wait with it.
            conn.terminate()
            raise QueryTimeout("the query ran past its deadline and was cancelled") from None
        except DRIVER_ERRORS as exc:
            raise SinkError(f"PostgreSQL query failed: {type(exc).__name__}: {exc}") from exc
        finally:
            await pool.release(conn)

    async def page(self, plan: PagePlan, budget: int, timeout: float) -> Page:
        """One page; rows encoded here."""
        sql, params = page_sql(plan)
        rows = await self._fetch(sql, params, timeout)
        width = len(KINDS[plan.kind].columns)
        records, key = collect_page(
            rows, self._readout[plan.kind], encoder_for(plan.fmt), width, plan.limit, budget
        )
        if key is not None:
            for i in KEY_TIMES[plan.kind]:
                key[i] = time_micros(key[i])
        return Page(records, key)

    async def latest(self, plan: LatestPlan, timeout: float) -> list[bytes]:
        """The latest records; rows encoded here."""
        sql, params = latest_sql(plan)
        rows = await self._fetch(sql, params, timeout)
        readout = self._readout[plan.kind]
        encode = encoder_for(plan.fmt)
        return [encode(readout(row)) for row in rows]

    async def close(self) -> None:
        """Close the pool (forcibly after a few seconds); idempotent."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            pool.terminate()
