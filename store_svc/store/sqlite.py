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
import sys
from collections import deque
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from store_svc.errors import QueryTimeout, SchemaError, SinkError
from store_svc.ingest.records import EPOCH, KINDS, KindSpec, Row
from store_svc.store.base import (
    TIME_COLUMN,
    Batch,
    LatestPlan,
    Page,
    PagePlan,
    Prepared,
    Reader,
    Sink,
    core_fields,
)
from store_svc.store.sqlite_worker import compile_converter, time_micros
from store_svc.tasks import cancel_and_wait

__all__ = ["SCHEMA_VERSION", "SqliteReader", "SqliteSink", "latest_sql", "page_sql"]

#: Bump with every change of the DDL below; a database with a higher number is refused.
SCHEMA_VERSION = 1

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("sqlite_worker.py")

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


def _plan(spec: KindSpec) -> str:
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


_PLANS = {kind: _plan(spec) for kind, spec in KINDS.items()}
# Times are turned into integers here, on the way out: a datetime costs more to send
# and decode than an int, and the writer process is the busier of the two.
_SEND = {
    kind: compile_converter(
        "".join("t" if c == "t" else "-" for c in plan), append_ingested_at=False
    )
    for kind, plan in _PLANS.items()
}
_WRITER_PLANS = {kind: plan.replace("t", "-") for kind, plan in _PLANS.items()}
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def to_sqlite_rows(spec: KindSpec, rows: list[Row], ingested_at: int) -> list[Row]:
    """Turn rows into SQLite parameters exactly as the writer process does.

    The service itself sends rows to the writer process, which converts them there;
    this function exists for the raw-insert benchmark ceiling and for tests.

    Args:
        spec: the record kind.
        rows: validated rows.
        ingested_at: the commit time, in microseconds since the epoch.

    Returns:
        Parameter tuples for :func:`upsert_sql`.
    """
    convert = _CONVERTERS[spec.kind]
    return [convert(row, ingested_at) for row in _decode(_encode(rows))]


#: The writer process's full conversion, for :func:`to_sqlite_rows` (compiled once).
_CONVERTERS = {kind: compile_converter(plan) for kind, plan in _PLANS.items()}


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


class _Worker:
    """One ``sqlite_worker.py`` process: framed MessagePack requests, replies in order.

    Args:
        role: ``writer`` or ``reader`` (for messages).
        args: extra command-line arguments (``--read`` for a reader).
    """

    def __init__(self, role: str, args: tuple[str, ...] = ()) -> None:
        self.role = role
        self._args = args
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: deque[asyncio.Future[Any]] = deque()

    @property
    def running(self) -> bool:
        """Whether the process is up (it is cleared when the process exits)."""
        return self.proc is not None

    async def start(self) -> None:
        """Start the process (not yet opened)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_WORKER),
            *self._args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.proc = proc
        self._reader = asyncio.create_task(self._read_replies(proc), name=f"sqlite-{self.role}")

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each reply to the request it answers (replies come in request order)."""
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(4)
                reply = _decode(await proc.stdout.readexactly(int.from_bytes(head)))
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionResetError, IndexError) as exc:
            self._fail_replies(SinkError(f"the SQLite {self.role} process exited ({exc!r})"))
            if self.proc is proc:
                self.proc = None
                self._reader = None
                if proc.returncode is None:
                    proc.kill()

    def _fail_replies(self, exc: SinkError) -> None:
        replies, self._replies = self._replies, deque()
        for fut in replies:
            if not fut.done():
                fut.set_exception(exc)

    def send(self, op: str, arg: Any) -> asyncio.Future[Any]:
        """Send one request; the returned future gets its reply."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            raise SinkError(f"the SQLite {self.role} is not running")
        body = _encode([op, arg])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(fut)
        proc.stdin.write(len(body).to_bytes(4, "big") + body)
        return fut

    async def result(self, fut: asyncio.Future[Any]) -> Any:
        """Wait for a reply; a failed request raises :class:`SinkError`."""
        proc = self.proc
        if proc is not None and proc.stdin is not None:
            try:
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                await self.discard()
                raise SinkError(f"the SQLite {self.role} process exited ({exc!r})") from None
        ok, result, retryable = await fut
        if not ok:
            raise SinkError(str(result), retryable=bool(retryable))
        return result

    async def call(self, op: str, arg: Any) -> Any:
        """Send one request and wait for its reply."""
        return await self.result(self.send(op, arg))

    async def discard(self) -> None:
        """Kill the process; requests still waiting fail with :class:`SinkError`."""
        proc, self.proc = self.proc, None
        reader, self._reader = self._reader, None
        self._fail_replies(SinkError(f"the SQLite {self.role} was stopped"))
        await cancel_and_wait(reader)
        if proc is None:
            return
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    async def close(self, timeout: float | None = None) -> None:
        """Ask the process to close its database and end; idempotent.

        Args:
            timeout: how long to wait for it (a reader may still be running a
                query); then it is killed. ``None`` waits (the writer checkpoints).
        """
        if self.proc is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.call("close", None)
        except SinkError as exc:
            log.warning("closing the SQLite %s: %s", self.role, exc)
        except TimeoutError:
            log.warning("the SQLite %s did not close within %gs; killed", self.role, timeout)
        await self.discard()


class SqliteSink(Sink):
    """Stores rows in a SQLite file, through a writer process of its own.

    The writer is started by :meth:`open` and restarted by the next :meth:`write`
    if it dies; a write in flight when it dies fails with a retryable
    :class:`SinkError`, so the batcher keeps the batch and tries again. Queries
    run in reader processes of their own (:meth:`reader`).

    Args:
        path: the database file; its folder is created if missing.
        synchronous: the ``synchronous`` pragma (``NORMAL`` or ``FULL``; see settings).
    """

    name = "sqlite"
    overlaps_writes = True

    def __init__(
        self, path: Path, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._writer = _Worker("writer")
        self._lock = asyncio.Lock()
        self._open_arg = {
            "path": str(path),
            "synchronous": synchronous,
            "busy_timeout_ms": busy_timeout_ms,
            "ddl": _DDL,
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
        except SinkError as exc:
            await self._writer.discard()
            if not exc.retryable and "schema version" in str(exc):
                raise SchemaError(str(exc)) from None
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

    async def counts(self) -> dict[str, int]:
        """Rows per table."""
        await self._ensure_writer()
        result: dict[str, int] = await self._writer.call("counts", list(KINDS))
        return result

    async def close(self) -> None:
        """Checkpoint, close the file and end the writer process; idempotent."""
        async with self._lock:
            await self._writer.close()

    def reader(self, concurrency: int) -> Reader:
        """Reader processes on read-only connections (WAL: they never block the writer).

        Args:
            concurrency: reader processes, each running one query at a time.
        """
        return SqliteReader(self.path, concurrency, self._busy_timeout_ms)


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
    when = TIME_COLUMN[plan.kind]
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
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all = [_Worker("reader", ("--read",)) for _ in range(concurrency)]
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

    async def _ready(self, worker: _Worker) -> None:
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
