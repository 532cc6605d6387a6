"""Retention on every sink: rows older than ``STORE_RETENTION_<KIND>`` go, in small
steps off the write path (SQLite, plain PostgreSQL) or as whole chunks (TimescaleDB);
a shared database runs one pass at a time; late records older than the retention are
refused at the edge; passes show in health and the metrics."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from benchmarks.overload import BURN
from store_svc.core import HealthStatus
from store_svc.ingest.decode import PayloadDecoder
from store_svc.kinds import Row
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings
from store_svc.store.base import Expired, Sink
from store_svc.store.memory import MemorySink
from store_svc.store.postgres import PostgresSink
from store_svc.store.sqlite import SqliteSink

from .conftest import until

NOW = datetime.now(UTC)
DAY = timedelta(days=1)


def trade_rows(symbol: str, times: list[datetime]) -> list[Row]:
    """Trade rows as intake makes them, at the given times."""
    body = [
        {"symbol": symbol, "ts": t.isoformat(), "price": "1.5", "size": i + 1}
        for i, t in enumerate(times)
    ]
    decoded = PayloadDecoder(1 << 30, 86_400).decode(
        "trades", None, json.dumps(body).encode(), None, NOW
    )
    assert not decoded.rejects
    return decoded.rows


def old_and_new(old: int, new: int, kind: str = "trades", spread: timedelta = DAY) -> list[Row]:
    """``old`` rows of ``kind`` from 10 days ago back over ``spread``, and ``new``
    ones of the last hours."""
    step = spread / max(old, 1)
    olds = [NOW - 10 * DAY - i * step for i in range(old)]
    news = [NOW - timedelta(hours=2) - i * timedelta(seconds=1) for i in range(new)]
    return [*rows_at(kind, "OLD", olds), *rows_at(kind, "NEW", news)]


def rows_at(kind: str, symbol: str, times: list[datetime]) -> list[Row]:
    """Rows of ``kind`` as intake makes them, one per time."""
    if kind == "trades":
        return trade_rows(symbol, times) if times else []
    decoder = PayloadDecoder(1 << 30, 86_400)
    rows: list[Row] = []
    for t in times:
        if kind == "bars":
            body = {"symbol": symbol, "resolution": "1m", "ts": t.isoformat(), "open": "1",
                    "high": "1", "low": "1", "close": "1", "volume": "1"}  # fmt: skip
            headers = None
        elif kind == "quotes":
            body = {"symbol": symbol, "timestamp": t.isoformat(), "bid": "1", "volume": 1}
            headers = None
        else:
            body = {"symbol": symbol, "expiry": "2031-01-17", "strike": "100",
                    "option_type": "C"}  # fmt: skip
            headers = {"Md-Ts": t.isoformat()}
        rows += decoder.decode(kind, None, json.dumps(body).encode(), headers, NOW).rows
    return rows


# --- the pass itself, on the in-memory sink -----------------------------------------


@pytest.mark.logic
async def test_a_pass_removes_in_steps_and_keeps_what_is_recent() -> None:
    sink = MemorySink()
    await sink.write({"trades": old_and_new(25, 5)})
    steps: list[int] = []
    real = sink.expire

    async def counted(kind: str, before: datetime, limit: int) -> Expired:
        step = await real(kind, before, limit)
        steps.append(step.rows)
        return step

    sink.expire = counted  # type: ignore[method-assign]
    removed = await sink.expire_pass({"trades": NOW - DAY}, limit=10, pause_s=0)
    assert removed == {"trades": 25}
    assert steps == [10, 10, 5]
    assert {r[0] for r in await sink.rows("trades")} == {"NEW"}


@pytest.mark.logic
def test_a_record_older_than_its_kinds_retention_is_refused_at_the_edge() -> None:
    decoder = PayloadDecoder(1 << 20, 86_400, {"trades": 7 * DAY, "options": DAY})
    body = [
        {"symbol": "A", "ts": (NOW - 8 * DAY).isoformat(), "price": "1", "size": 1},
        {"symbol": "A", "ts": (NOW - 6 * DAY).isoformat(), "price": "1", "size": 2},
    ]
    out = decoder.decode("trades", None, json.dumps(body).encode(), None, NOW)
    assert len(out.rows) == 1
    (reject,) = out.rejects
    assert reject.reason == "beyond_retention"
    assert "older than this store keeps" in reject.detail
    assert reject.index == 0
    # Kinds without a retention keep every time since 1900.
    old_bar = {
        "symbol": "A", "resolution": "1d", "ts": "1950-01-02T00:00:00Z", "open": "1",
        "high": "1", "low": "1", "close": "1", "volume": "1",
    }  # fmt: skip
    assert decoder.decode("bars", None, json.dumps(old_bar).encode(), None, NOW).rows
    # Options take their time from Md-Ts: an old one refuses the whole message.
    snapshot = {
        "symbol": "A", "expiry": "2030-01-18", "strike": "100", "option_type": "call",
        "volume": 1, "open_interest": 1,
    }  # fmt: skip
    from store_svc.errors import RejectedInput

    with pytest.raises(RejectedInput) as refused:
        decoder.decode(
            "options", None, json.dumps(snapshot).encode(),
            {"Md-Ts": (NOW - 2 * DAY).isoformat()}, NOW,
        )  # fmt: skip
    assert refused.value.reason == "beyond_retention"


# --- every real sink ------------------------------------------------------------------


KINDS_ALL = ("bars", "trades", "quotes", "options")


async def _expire_on(sink: Sink) -> None:
    """Every kind: 2,500 old rows go in steps, 100 recent ones stay."""
    async with sink:
        for kind in KINDS_ALL:
            await sink.write({kind: old_and_new(250 if kind == "options" else 2_500, 100, kind)})
        cutoffs = dict.fromkeys(KINDS_ALL, NOW - DAY)
        removed = await sink.expire_pass(cutoffs, limit=1_000, pause_s=0)
        assert removed == {k: 250 if k == "options" else 2_500 for k in KINDS_ALL}
        assert await sink.counts() == dict.fromkeys(KINDS_ALL, 100)
        assert await sink.expire_pass(cutoffs, 1_000, 0) == dict.fromkeys(KINDS_ALL, 0)


async def test_sqlite_removes_old_rows_of_every_kind_by_a_time_index(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    await _expire_on(SqliteSink(db, expiring=frozenset(KINDS_ALL)))
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"trades_ts_age", "bars_ts_age", "quotes_timestamp_age", "options_ts_age"} <= names
    other = tmp_path / "other.db"
    async with SqliteSink(other, expiring=frozenset({"trades"})):
        pass
    with sqlite3.connect(other) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "bars_ts_age" not in names  # no retention, no index to pay for


@pytest.mark.slow
async def test_plain_postgresql_removes_old_rows_of_every_kind_by_brin_indexes(
    pg_url: str,
) -> None:
    await _expire_on(PostgresSink(pg_url, timescaledb="off", expiring=frozenset(KINDS_ALL)))
    conn = await asyncpg.connect(pg_url)
    try:
        method = await conn.fetchval(
            "SELECT am.amname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am am ON am.oid = c.relam WHERE c.relname = 'trades_ts_age'"
        )
    finally:
        await conn.close()
    assert method == "brin"


@pytest.mark.slow
async def test_instances_starting_together_make_the_indexes_once(pg_url: str) -> None:
    sinks = [PostgresSink(pg_url, timescaledb="off", expiring=frozenset(KINDS_ALL))
             for _ in range(3)]  # fmt: skip
    try:
        await asyncio.gather(*(s.open() for s in sinks))
    finally:
        await asyncio.gather(*(s.close() for s in sinks))


@pytest.mark.slow
async def test_a_shared_postgresql_runs_one_pass_at_a_time(pg_url: str) -> None:
    async with (
        PostgresSink(pg_url, timescaledb="off") as one,
        PostgresSink(pg_url, timescaledb="off") as other,
    ):
        await one.write({"trades": old_and_new(10, 1)})
        async with one.retention_turn() as mine:
            assert mine
            assert await other.expire_pass({"trades": NOW - DAY}, 100, 0) is None
        assert await other.expire_pass({"trades": NOW - DAY}, 100, 0) == {"trades": 10}


# --- the service ------------------------------------------------------------------------


async def _seed(settings: Settings, rows: list[Row]) -> None:
    from store_svc.store.factory import make_sink

    async with make_sink(settings) as sink:
        await sink.write({"trades": rows})


@pytest.mark.slow
async def test_the_service_runs_passes_and_shows_them(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    settings = make_settings(retention_trades="1d", retention_interval_s=0.5)
    await _seed(settings, old_and_new(3_000, 50))
    async with StoreService(settings) as svc:
        await until(lambda: svc.stats.retention_removed["trades"] == 3_000, timeout=20)
        reply = await client.request("mdp.store.health", b"", timeout=10)
        component = next(
            c for c in HealthStatus.model_validate_json(reply.data).components
            if c.name == "retention"
        )  # fmt: skip
        assert component.state == "healthy"
        assert component.details["keeps"] == "trades 1d"
        assert component.details["removed"] == "trades 3000"
        assert int(component.details["passes"]) >= 1
        # A late trade older than the retention is refused with the reason, not stored.
        late = {"symbol": "LATE", "ts": (NOW - 2 * DAY).isoformat(), "price": "1", "size": 1}
        answer = json.loads(
            (await client.request("mdp.store.write.trades", json.dumps(late).encode(),
                                  timeout=10)).data
        )  # fmt: skip
        assert answer["accepted"] == 0
        assert answer["errors"][0]["reason"] == "beyond_retention"
        assert (await svc.sink.counts())["trades"] == 50


@pytest.mark.slow
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "a-core-busy"])
async def test_writes_go_on_while_a_pass_runs(
    busy: bool, make_settings: Callable[..., Settings], client: NATS
) -> None:
    """60,000 old rows in steps of 500: the pass takes many steps, and request-reply
    writes sent meanwhile are answered before it ends (each waits one step at most),
    also with another process burning a core."""
    burner = (
        await asyncio.create_subprocess_exec(sys.executable, "-c", BURN, "120") if busy else None
    )
    try:
        await _writes_during_a_pass(make_settings, client)
    finally:
        if burner is not None:
            burner.kill()
            await burner.wait()


async def _writes_during_a_pass(make_settings: Callable[..., Settings], client: NATS) -> None:
    settings = make_settings(retention_trades="1d", retention_interval_s=3600, retention_batch=500)
    async with StoreService(settings) as svc:
        await until(lambda: svc.stats.retention_done == 1, timeout=60)  # the first pass
        await svc.sink.write({"trades": old_and_new(60_000, 0)})
        answered: list[float] = []

        async def write_meanwhile() -> None:
            n = 0
            while True:
                body = {"symbol": "LIVE", "ts": NOW.isoformat(), "price": "1", "size": n + 1}
                await client.request("mdp.store.write.trades", json.dumps(body).encode(),
                                     timeout=10)  # fmt: skip
                answered.append(time.monotonic())
                n += 1
                await asyncio.sleep(0.01)

        writer = asyncio.create_task(write_meanwhile())
        began = time.monotonic()
        removed = await svc.retention.run_pass()
        ended = time.monotonic()
        writer.cancel()
        assert removed == {"trades": 60_000}
        during = [t for t in answered if began < t < ended]
        assert len(during) >= 5, (len(during), ended - began)
        # No write waited for the pass: the longest gap between answers is a step or so.
        gaps = [b - a for a, b in zip([began, *during], [*during, ended], strict=True)]
        assert max(gaps) < (ended - began) / 4, (max(gaps), ended - began)
