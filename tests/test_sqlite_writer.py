"""The SQLite writer process's order guard, driven directly (real SQLite file)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from store_svc.devtools.processes import freeze, thaw
from store_svc.ingest.decode import PayloadDecoder
from store_svc.store.codec import key_decimal_text
from store_svc.store.sqlite import SqliteSink
from store_svc.store.sqlite_worker import BatchAheadFailed, Writer

from .test_ingest import bar, locked


def wire(sink: SqliteSink, close: str) -> list[Any]:
    decoded = PayloadDecoder(1 << 20, 86_400).decode(
        "bars", None, json.dumps(bar(close=close)).encode(), None, datetime.now(UTC)
    )
    # As the parent sends it: through MessagePack (Decimals travel as text).
    return msgspec.msgpack.decode(msgspec.msgpack.encode(sink._wire({"bars": decoded.rows})))


def stored_close(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT close FROM bars").fetchone()[0])


def test_a_batch_sent_ahead_is_refused_after_the_one_before_it_failed(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    sink = SqliteSink(db, busy_timeout_ms=10)
    writer = Writer()
    writer.open(sink._open_arg)
    with locked(db), pytest.raises(sqlite3.OperationalError):
        writer.write(wire(sink, "1"))  # the batch ahead fails (database locked)
    # The next batch was already sent: it must not overtake the failed one.
    with pytest.raises(BatchAheadFailed):
        writer.write_ahead(wire(sink, "2"))
    writer.write(wire(sink, "1"))  # the retry of the failed batch, in turn
    writer.write(wire(sink, "2"))  # then the refused one, again
    assert stored_close(db) == "2", "the later correction wins"
    writer.write_ahead(wire(sink, "3"))  # after a success, a batch ahead is written
    assert stored_close(db) == "3"
    writer.close(None)


@pytest.mark.logic
def test_key_decimals_keep_all_their_digits() -> None:
    # 30 and 38 significant digits: normalize() under the default 28-digit context
    # rounded these, and two distinct trade prices became one key.
    assert key_decimal_text("12345678901234567890123456789.10") == "12345678901234567890123456789.1"
    assert key_decimal_text("12345678901234567890123456790") == "12345678901234567890123456790"
    assert key_decimal_text("1.2345678901234567890123456789012345670") == (
        "1.234567890123456789012345678901234567"
    )
    assert key_decimal_text("1.2E+2") == "120"
    assert key_decimal_text("-0.00") == "0"


async def test_trades_differing_beyond_28_digits_are_two_rows(tmp_path: Path) -> None:
    ts = datetime(2024, 1, 2, tzinfo=UTC)
    prices = [Decimal("12345678901234567890123456789.10"), Decimal("12345678901234567890123456790")]
    rows = [("P", ts, price, 1, None, ()) for price in prices]
    async with SqliteSink(tmp_path / "p.db") as sink:
        await sink.write({"trades": rows})
        stored = sorted(r[2] for r in await sink.rows("trades"))
    assert stored == sorted(prices)


async def test_a_frozen_writer_cannot_hold_up_close_and_loses_nothing_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer stuck at shutdown (a stalled disk; here SIGSTOP) is killed after its
    close timeout; what it had committed is in the WAL and is read at the next open."""
    monkeypatch.setattr("store_svc.store.sqlite.WRITER_CLOSE_TIMEOUT_S", 0.5)
    ts = datetime(2024, 1, 2, tzinfo=UTC)
    rows = [("F", ts, Decimal(i), 1, None, ()) for i in range(1, 101)]
    sink = SqliteSink(tmp_path / "f.db")
    await sink.open()
    await sink.write({"trades": rows})
    pid = sink.pid
    assert pid is not None
    freeze(pid)
    try:
        await asyncio.wait_for(sink.close(), 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            thaw(pid)
    assert "did not close within 0.5s; killed" in caplog.text
    async with SqliteSink(tmp_path / "f.db") as again:
        assert len(await again.rows("trades")) == 100


def _open_at_once(arg: dict[str, Any], barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        Writer().open(arg)
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_two_processes_setting_up_one_new_file_at_once_both_open_it(tmp_path: Path) -> None:
    """Two instances started together on one SQLite file: switching a new file to
    WAL can answer "database is locked" at once, without the busy timeout's wait
    (about one pair in ten here, before the writer opened again).

    Forked children (fast to start) touch only sqlite3 and the queue; on Python 3.12+
    a fork beside a live thread warns, which this project's pytest turns into an error.
    """
    ctx = multiprocessing.get_context("fork")
    failures = []
    for i in range(100):
        arg = SqliteSink(tmp_path / f"s{i}.db")._open_arg
        barrier, results = ctx.Barrier(2, timeout=10), ctx.Queue()
        procs = [
            ctx.Process(target=_open_at_once, args=(arg, barrier, results), daemon=True)
            for _ in "ab"
        ]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(10)
            got = [results.get(timeout=1) for p in procs if p.exitcode == 0]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        assert len(got) == 2, [p.exitcode for p in procs]
        failures += [r for r in got if r != "ok"]
    assert not failures, failures
