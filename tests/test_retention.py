"""Retention on every sink: rows older than ``STORE_RETENTION_<KIND>`` go, in small
steps off the write path (SQLite, plain PostgreSQL) or as whole chunks (TimescaleDB);
a shared database runs one pass at a time; late records older than the retention are
refused at the edge; passes show in health and the metrics."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from store_svc.core import HealthStatus
from store_svc.ingest.decode import PayloadDecoder
from store_svc.kinds import Row
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings
from store_svc.store.base import Sink
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


def old_and_new(old: int, new: int) -> list[Row]:
    """``old`` trades 10 to 20 days old and ``new`` ones of the last hours."""
    olds = [NOW - 10 * DAY - i * timedelta(seconds=10) for i in range(old)]
    news = [NOW - timedelta(hours=2) - i * timedelta(seconds=1) for i in range(new)]
    return [*trade_rows("OLD", olds), *(trade_rows("NEW", news) if news else [])]


# --- the pass itself, on the in-memory sink -----------------------------------------


@pytest.mark.logic
async def test_a_pass_removes_in_steps_and_keeps_what_is_recent() -> None:
    sink = MemorySink()
    await sink.write({"trades": old_and_new(25, 5)})
    steps: list[int] = []
    real = sink.expire

    async def counted(kind: str, before: datetime, limit: int) -> int:
        n = await real(kind, before, limit)
        steps.append(n)
        return n

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


async def _expire_on(sink: Sink) -> None:
    async with sink:
        await sink.write({"trades": old_and_new(2_500, 100)})
        removed = await sink.expire_pass({"trades": NOW - DAY}, limit=1_000, pause_s=0)
        assert removed == {"trades": 2_500}
        assert (await sink.counts())["trades"] == 100
        assert await sink.expire_pass({"trades": NOW - DAY}, 1_000, 0) == {"trades": 0}


async def test_sqlite_removes_old_rows_by_a_time_index(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    await _expire_on(SqliteSink(db, expiring=frozenset({"trades"})))
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "trades_ts_age" in names
    assert "bars_ts_age" not in names  # no retention, no index to pay for


@pytest.mark.slow
async def test_plain_postgresql_removes_old_rows_by_a_brin_index(pg_url: str) -> None:
    await _expire_on(PostgresSink(pg_url, timescaledb="off", expiring=frozenset({"trades"})))
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
async def test_writes_go_on_while_a_pass_runs(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    """60,000 old rows in steps of 500: the pass takes many steps, and request-reply
    writes sent meanwhile are answered before it ends (each waits one step at most)."""
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
