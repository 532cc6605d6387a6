"""Queries on SQLite: the read plans as SQL, run in reader processes.

Each reader process (``sqlite_worker.py --read``) holds a read-only connection;
WAL lets it read while the writer commits, and it encodes the records itself, so
the service's event loop only forwards bytes. A query waits for a free reader and
runs under the caller's deadline.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from store_svc.errors import QueryTimeout
from store_svc.kinds import KINDS, KindSpec
from store_svc.store.reads import LatestPlan, Page, PagePlan, Reader, core_fields
from store_svc.store.sqlite_process import WorkerProcess

__all__ = ["SqliteReader", "latest_sql", "page_sql"]


#: How long a reader process may take to close (a query it runs is abandoned).
_READER_CLOSE_TIMEOUT_S = 1.0

#: The sort key (see ``KEY_TYPES``) as SQLite expressions. Text compares as UTF-8
#: bytes (BINARY collation), key Decimals are stored in canonical text.
_SORT = {
    "bars": ("ts", "symbol", "resolution"),
    "trades": (
        "ts",
        "symbol",
        "price",
        "size",
        "exchange IS NOT NULL",
        "ifnull(exchange, '')",
        "conditions",
    ),
    "quotes": ("timestamp", "symbol"),
    "options": ("ts", "symbol", "expiry", "strike", "option_type"),
}


def _readout_fields(spec: KindSpec) -> list[list[Any]]:
    fields: list[list[Any]] = []
    for name in core_fields(spec.kind):
        if name in spec.time_columns:
            code = "T"
        elif name == "delayed":
            code = "B"
        elif name == "conditions":
            code = "J"
        else:
            code = "-"
        fields.append([name, spec.columns.index(name), code])
    return fields


def page_sql(plan: PagePlan) -> tuple[str, list[Any]]:
    """The SQLite statement of one query page: ``limit + 1`` rows, record columns
    then the sort key.

    Each symbol is read on its own (the table key's index gives its rows in time
    order; only ties are sorted, and it stops after ``limit + 1``) and the
    per-symbol pages are merged (``UNION ALL``), so a page costs about ``limit`` x
    symbols rows however long the range.

    Args:
        plan: the validated page request.

    Returns:
        The statement and its parameters.
    """
    spec = KINDS[plan.kind]
    key = _SORT[plan.kind]
    when = spec.time_column
    where = ["symbol = ?"]
    filters: list[Any] = []
    if plan.resolution is not None:
        where.append("resolution = ?")
        filters.append(plan.resolution)
    if plan.start is not None:
        where.append(f"{when} >= ?")
        filters.append(plan.start)
    if plan.end is not None:
        where.append(f"{when} < ?")
        filters.append(plan.end)
    past, way = ("<", " DESC") if plan.descending else (">", "")
    if plan.after is not None:
        # The first condition is implied by the second; it lets the index seek.
        where.append(f"{when} {past}= ?")
        filters.append(plan.after[0])
        where.append(f"({', '.join(key)}) {past} ({', '.join('?' * len(key))})")
        filters.extend(plan.after)
    named = ", ".join(f"{expr} AS k{i}" for i, expr in enumerate(key))
    one = (
        f"SELECT {', '.join(spec.columns)}, {named} FROM {spec.table} "
        f"WHERE {' AND '.join(where)} ORDER BY {', '.join(k + way for k in key)} LIMIT ?"
    )
    params: list[Any] = []
    for symbol in plan.symbols:
        params += [symbol, *filters, plan.limit + 1]
    if len(plan.symbols) == 1:
        return one, params
    merged = ", ".join(f"k{i}{way}" for i in range(len(key)))
    arms = " UNION ALL ".join(f"SELECT * FROM ({one})" for _ in plan.symbols)
    return f"{arms} ORDER BY {merged} LIMIT ?", [*params, plan.limit + 1]


def latest_sql(plan: LatestPlan) -> list[list[Any]]:
    """One SQLite statement per symbol for its latest record(s).

    Args:
        plan: the validated lookup.

    Returns:
        ``[statement, parameters]`` per symbol, in the plan's order.
    """
    spec = KINDS[plan.kind]
    cols = ", ".join(spec.columns)
    if plan.kind == "bars" and plan.resolution is None:
        # SQLite takes the bare columns from the row holding the max().
        sql = (
            f"SELECT {cols}, max(ts) FROM bars WHERE symbol = ? "
            "GROUP BY resolution ORDER BY resolution"
        )
        return [[sql, [symbol]] for symbol in plan.symbols]
    where = "symbol = ?" + (" AND resolution = ?" if plan.resolution is not None else "")
    order = ", ".join(f"{k} DESC" for k in _SORT[plan.kind])
    sql = f"SELECT {cols} FROM {spec.table} WHERE {where} ORDER BY {order} LIMIT 1"
    extra = [plan.resolution] if plan.resolution is not None else []
    return [[sql, [symbol, *extra]] for symbol in plan.symbols]


class SqliteReader(Reader):
    """Runs queries in reader processes; a query waits for a free one.

    Args:
        path: the database file (the writer has created it).
        concurrency: reader processes.
        busy_timeout_ms: the ``busy_timeout`` pragma of the read connections.
    """

    def __init__(self, path: Path, concurrency: int, busy_timeout_ms: int) -> None:
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        self._all = [WorkerProcess("reader", ("--read",)) for _ in range(concurrency)]
        for worker in self._all:
            self._idle.put_nowait(worker)
        self._open_arg = {
            "path": str(path),
            "busy_timeout_ms": busy_timeout_ms,
            "fields": {kind: _readout_fields(spec) for kind, spec in KINDS.items()},
        }

    async def open(self) -> None:
        """Start every reader process and open its connection."""
        for worker in self._all:
            await self._ready(worker)

    async def _ready(self, worker: WorkerProcess) -> None:
        if worker.running:
            return
        await worker.start()
        try:
            await worker.call("open", self._open_arg)
        except BaseException:
            await worker.discard()
            raise

    async def _run(self, op: str, arg: list[Any], timeout: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                worker = await self._idle.get()
        except TimeoutError:
            raise QueryTimeout("every query worker stayed busy until the deadline") from None
        try:
            await self._ready(worker)
            remaining = max(0.0, deadline - loop.time())
            fut = worker.send(op, [*arg, remaining])
            try:
                # The worker interrupts itself at the deadline; the extra second
                # covers a worker stuck outside SQLite's VM, which is replaced.
                async with asyncio.timeout(remaining + 1.0):
                    reply: list[Any] = await worker.result(fut)
            except TimeoutError:
                await worker.discard()
                raise QueryTimeout("the query worker did not answer in time") from None
        finally:
            self._idle.put_nowait(worker)
        if reply[0] == "timeout":
            raise QueryTimeout("the query ran past its deadline and was interrupted")
        return reply

    async def page(self, plan: PagePlan, budget: int, timeout: float) -> Page:
        """One page, read and encoded in a reader process."""
        sql, params = page_sql(plan)
        width = len(KINDS[plan.kind].columns)
        reply = await self._run(
            "page", [plan.kind, plan.fmt, sql, params, width, plan.limit, budget], timeout
        )
        return Page(reply[1], reply[2])

    async def latest(self, plan: LatestPlan, timeout: float) -> list[bytes]:
        """The latest records, read and encoded in a reader process."""
        reply = await self._run("latest", [plan.kind, plan.fmt, latest_sql(plan)], timeout)
        records: list[bytes] = reply[1]
        return records

    async def close(self) -> None:
        """End the reader processes (killed if one is stuck)."""
        for worker in self._all:
            await worker.close(_READER_CLOSE_TIMEOUT_S)
