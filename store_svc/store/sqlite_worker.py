"""The SQLite writer and reader processes (``python -m store_svc.store.sqlite_worker``).

SQLite runs in a process of its own, not a thread: the ``sqlite3`` module releases
the GIL around every row it steps, and a writer thread then waits for the GIL
behind the busy event loop once per row (measured: 258,000 rows/s alone, 7,000
rows/s beside a busy thread). A process has its own interpreter and runs in
parallel with intake on a second core.

Frames on stdin/stdout: a 4-byte big-endian length, then MessagePack
``[op, arg]``; each request gets one reply, in order: ``[True, result, ""]``, or
``[False, text, code]`` where ``code`` is one of :data:`ERROR_CODES` (the parent
decides from the code alone what the failure means; the text is for its log). The
parent may send the next batch (``write_ahead``) before the reply to the one ahead
of it; such a batch is refused unwritten if the one ahead failed, and is then sent
again as an ordinary ``write`` after it, so batches commit in order. The parent
sends the DDL, statements and column plans with ``open``; this module imports
nothing of the service but ``store/codec.py`` (it starts fast and small).

Started with ``--read``, it is a *reader*: a read-only connection (WAL lets it read
while the writer commits) that runs the query API's pages and latest-record
lookups, converts the rows to Core's JSON values and encodes them (JSON or
MessagePack), so the service's event loop only forwards bytes. A query runs under
a deadline enforced by SQLite's progress handler.

The writer's plans are ``store/codec.py``'s write plans; the parent converts times
before sending, so its plans here carry ``-`` there.
"""

from __future__ import annotations

import gc
import sqlite3
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import msgspec

from store_svc.store.codec import (
    GC_THRESHOLDS,
    collect_page,
    compile_converter,
    compile_readout,
    encoder_for,
)

#: A database error that may pass (locked, busy, I/O): the same batch may succeed later.
RETRY = "retry"
#: The data itself is refused (a constraint, a value the driver cannot bind).
REFUSED = "refused"
#: The file holds a schema version newer than the parent understands.
SCHEMA_TOO_NEW = "schema_too_new"
#: A ``write_ahead`` whose predecessor failed: nothing written, send it again in turn.
AHEAD_FAILED = "ahead_failed"
#: Anything else (a bug in this process): reported, never retried.
INTERNAL = "internal"
ERROR_CODES = frozenset({RETRY, REFUSED, SCHEMA_TOO_NEW, AHEAD_FAILED, INTERNAL})

#: Checkpoint the WAL after this many commits or rows, whichever comes first, after
#: replying, so its cost never lands inside a commit's latency. It still delays the
#: next batch: with 1000-row batches a checkpoint every 32 commits took about 14 ms
#: and set the p99 publish→commit (23-24 ms at half load); every 8,000 rows it is
#: a quarter of that (p99 13-21 ms in four runs, same throughput; benchmark
#: core-sqlite-1000-trades).
CHECKPOINT_EVERY = 32
CHECKPOINT_ROWS = 8_000
#: The pause before opening again a file another process is setting up.
OPEN_RETRY_S = 0.02


class SchemaTooNew(Exception):
    """The file holds a schema version newer than the parent understands."""


class BatchAheadFailed(Exception):
    """A ``write_ahead`` whose predecessor failed (retryable, nothing written)."""


class Writer:
    """Owns the connection and answers requests."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.sql: dict[str, str] = {}
        self.select: dict[str, str] = {}
        self.convert: dict[str, Callable[..., tuple[Any, ...]]] = {}
        self.uncheckpointed_commits = 0
        self.uncheckpointed_rows = 0
        self.failed = False

    def open(self, arg: dict[str, Any]) -> None:
        """Open the file (made with its tables if missing) and check its schema.

        Two processes setting up the same file at once (two instances started
        together) can get "database is locked" at once, without the busy handler
        waiting: switching to WAL needs the file to itself. That is tried again until
        the busy timeout has passed (reproduced in ``tests/test_sqlite_writer.py``).
        """
        deadline = time.monotonic() + int(arg.get("busy_timeout_ms", 5000)) / 1000
        while True:
            try:
                self._open(arg)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(OPEN_RETRY_S)

    def _open(self, arg: dict[str, Any]) -> None:
        conn = sqlite3.connect(arg["path"], isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(arg.get('busy_timeout_ms', 5000))}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={arg['synchronous']}")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.executescript("BEGIN IMMEDIATE;" + arg["ddl"])
            found = conn.execute(
                "SELECT value FROM store_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(arg["schema_version"])
            if found is None:
                conn.execute(
                    "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )
            elif int(found[0]) > version:
                conn.execute("ROLLBACK")
                raise SchemaTooNew(
                    f"{arg['path']} has schema version {found[0]}; this version of "
                    f"store-svc understands up to {version}. Upgrade store-svc."
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.sql = arg["sql"]
        self.select = arg["select"]
        self.convert = {kind: compile_converter(plan) for kind, plan in arg["plans"].items()}

    def write(self, arg: list[Any]) -> None:
        self.failed = False  # an ordinary write (or a retry) restores the order
        self._write(arg)

    def write_ahead(self, arg: list[Any]) -> None:
        # Sent before the batch ahead of it was known to be committed: if that one
        # failed, writing this one now would overtake it (and a correction to a key
        # could be undone by the retry). Refuse; the parent writes it again in turn.
        if self.failed:
            raise BatchAheadFailed("the batch ahead of this one failed; not written")
        self._write(arg)

    def _write(self, arg: list[Any]) -> None:
        try:
            self._write_batch(arg)
        except BaseException:
            self.failed = True
            raise

    def _write_batch(self, arg: list[Any]) -> None:
        ingested_at, batch = arg
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for kind, rows in batch.items():
                convert = self.convert[kind]
                conn.executemany(self.sql[kind], [convert(r, ingested_at) for r in rows])
                self.uncheckpointed_rows += len(rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.uncheckpointed_commits += 1

    def after_reply(self, op: str) -> None:
        if op not in ("write", "write_ahead", "expire"):
            return
        due = self.uncheckpointed_commits >= CHECKPOINT_EVERY
        if due or self.uncheckpointed_rows >= CHECKPOINT_ROWS:
            self.uncheckpointed_commits = 0
            self.uncheckpointed_rows = 0
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def rows(self, kind: str) -> list[tuple[Any, ...]]:
        return self._conn().execute(self.select[kind]).fetchall()

    def expire(self, arg: list[Any]) -> int:
        # One small transaction: a write queued behind it waits for this step only.
        # The rows go by the time index made at open for kinds with a retention, and
        # by rowid or, in a WITHOUT ROWID table, by their key.
        table, column, key, before, limit = arg
        keys = ", ".join(key)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                f"DELETE FROM {table} WHERE ({keys}) IN "
                f"(SELECT {keys} FROM {table} WHERE {column} < ? LIMIT ?)",
                (before, limit),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.uncheckpointed_rows += cur.rowcount
        return int(cur.rowcount)

    def counts(self, kinds: list[str]) -> dict[str, int]:
        conn = self._conn()
        return {k: conn.execute(f"SELECT count(*) FROM {k}").fetchone()[0] for k in kinds}

    def close(self, _: Any) -> None:
        if self.conn is not None:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.conn.close()
            self.conn = None

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.ProgrammingError("the database is not open")
        return self.conn


class Reader:
    """A read-only connection that answers query pages and latest-record lookups."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.readout: dict[str, Callable[[Sequence[Any]], dict[str, Any]]] = {}
        self.deadline = 0.0

    def open(self, arg: dict[str, Any]) -> None:
        uri = "file:" + urllib.parse.quote(arg["path"]) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(arg.get('busy_timeout_ms', 5000))}")
        conn.execute("PRAGMA query_only=1")
        # Checked every few thousand VM steps: a query past its deadline is
        # interrupted ("interrupted" OperationalError) and answered as a timeout.
        conn.set_progress_handler(self._past_deadline, 2000)
        self.conn = conn
        self.readout = {kind: compile_readout(f) for kind, f in arg["fields"].items()}

    def _past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def _run(self, sql: str, params: list[Any]) -> list[Any] | None:
        if self.conn is None:
            raise sqlite3.ProgrammingError("the database is not open")
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                return None
            raise

    def page(self, arg: list[Any]) -> list[Any]:
        """``[kind, fmt, sql, params, key_start, limit, budget, seconds]`` ->
        ``["ok", records, next_key]`` or ``["timeout"]``."""
        kind, fmt, sql, params, key_start, limit, budget, seconds = arg
        self.deadline = time.monotonic() + seconds
        rows = self._run(sql, params)
        if rows is None:
            return ["timeout"]
        records, key = collect_page(
            rows, self.readout[kind], encoder_for(fmt), key_start, limit, budget
        )
        return ["ok", records, key]

    def latest(self, arg: list[Any]) -> list[Any]:
        """``[kind, fmt, [[sql, params], ...], seconds]`` -> ``["ok", records]`` or
        ``["timeout"]``; each statement yields the latest row(s) of one symbol."""
        kind, fmt, statements, seconds = arg
        self.deadline = time.monotonic() + seconds
        readout = self.readout[kind]
        encode = encoder_for(fmt)
        records: list[bytes] = []
        for sql, params in statements:
            rows = self._run(sql, params)
            if rows is None:
                return ["timeout"]
            records.extend(encode(readout(row)) for row in rows)
        return ["ok", records]

    def close(self, _: Any) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _read_frame(inp: BinaryIO) -> bytes | None:
    head = inp.read(4)
    if len(head) < 4:
        return None
    body = inp.read(int.from_bytes(head, "big"))
    return body


def serve(inp: BinaryIO, out: BinaryIO, read_only: bool = False) -> None:
    """Answer requests until ``close`` or the end of input."""
    # Batches arrive as lists of tuples of atoms: nothing the cyclic collector needs
    # to chase at CPython's default rate (store_svc/runtime/heap.py has the measurements).
    gc.set_threshold(*GC_THRESHOLDS)
    writer = Writer()
    reader = Reader()
    handlers: dict[str, Callable[[Any], Any]] = (
        {"open": reader.open, "page": reader.page, "latest": reader.latest, "close": reader.close}
        if read_only
        else {
            "open": writer.open,
            "write": writer.write,
            "write_ahead": writer.write_ahead,
            "rows": writer.rows,
            "counts": writer.counts,
            "expire": writer.expire,
            "close": writer.close,
        }
    )
    encode = msgspec.msgpack.encode
    decode = msgspec.msgpack.decode
    while (frame := _read_frame(inp)) is not None:
        op, arg = decode(frame)
        try:
            reply = [True, handlers[op](arg), ""]
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError) as exc:
            # The data itself is refused: trying the same batch again cannot help.
            reply = [False, f"{type(exc).__name__}: {exc}", REFUSED]
        except sqlite3.Error as exc:
            reply = [False, f"{type(exc).__name__}: {exc}", RETRY]
        except SchemaTooNew as exc:
            reply = [False, str(exc), SCHEMA_TOO_NEW]
        except BatchAheadFailed as exc:
            reply = [False, str(exc), AHEAD_FAILED]
        except Exception as exc:  # a bug here must be reported, not kill the writer
            traceback.print_exc(file=sys.stderr)
            reply = [False, f"{type(exc).__name__}: {exc}", INTERNAL]
        body = encode(reply)
        out.write(len(body).to_bytes(4, "big") + body)
        out.flush()
        if op == "close":
            return
        try:
            writer.after_reply(op)
        except sqlite3.Error as exc:
            print(f"sqlite-writer: checkpoint failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer, read_only="--read" in sys.argv[1:])
