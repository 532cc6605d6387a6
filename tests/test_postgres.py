"""PostgreSQL sink: idempotency on both sinks, schema versioning, and a real outage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from store_svc.core import HealthStatus
from store_svc.devtools.pgserver import PostgresServer
from store_svc.errors import SchemaError
from store_svc.kinds import KINDS
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings
from store_svc.store.postgres import PostgresSink

from .conftest import until
from .test_bad_input import barrier, trade
from .test_ingest import bar


async def test_in_batch_duplicates_and_redelivery_leave_one_row(
    store: StoreService, client: NATS
) -> None:
    dup = trade(symbol="DUP", exchange=None)
    await client.publish("mdp.store.write.trades", json.dumps([dup, dup, dup]).encode())
    bars = [bar(close="1"), bar(close="2"), bar(close="3")]  # one key, corrected twice
    for _ in range(2):  # the same batch redelivered
        await client.publish("mdp.store.write.bars", json.dumps(bars).encode())
    await client.publish(
        "mdp.store.write.trades", json.dumps([trade(price="1.5"), trade(price="1.50")]).encode()
    )
    await barrier(client)
    counts = await store.sink.counts()
    assert counts["bars"] == 1
    assert counts["trades"] == 3  # DUP, AAPL at 1.5 (== 1.50), the barrier
    (row,) = await store.sink.rows("bars")
    assert row[KINDS["bars"].columns.index("close")] == Decimal("3"), "the last write wins"


async def test_a_decimal_key_written_two_ways_in_one_batch_is_one_row(
    store: StoreService, client: NATS
) -> None:
    # Staged as text, merged as numeric: 200 and 200.00 are one strike in one statement.
    option = {"symbol": "AAPL", "expiry": "2026-01-16", "option_type": "C"}
    batch = [{**option, "strike": "200", "bid": "1"}, {**option, "strike": "200.00", "bid": "2"}]
    headers = {"Md-Ts": "1714570200"}
    await client.publish("mdp.store.write.options", json.dumps(batch).encode(), headers=headers)
    await barrier(client)
    (row,) = await store.sink.rows("options")
    columns = KINDS["options"].columns
    assert row[columns.index("strike")] == Decimal("200")
    assert row[columns.index("bid")] == Decimal("2"), "the last write wins"


async def test_values_come_back_exactly(
    pg_url: str, make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(database_url=pg_url)):
        price = "12345678901234567890.123456789012345678"
        reply = await client.request(
            "mdp.store.write.trades",
            json.dumps(trade(price=price, conditions=["@", "T", "ünï"])).encode(),
            timeout=5,
        )
        assert json.loads(reply.data)["accepted"] == 1
    conn = await asyncpg.connect(pg_url)
    try:
        rec = await conn.fetchrow("SELECT price, ts, conditions, pg_typeof(price) AS t FROM trades")
    finally:
        await conn.close()
    assert rec["price"] == Decimal(price)
    assert str(rec["t"]) == "numeric"
    assert rec["ts"].isoformat() == "2024-05-01T13:30:00.500000+00:00"
    assert rec["conditions"] == ["@", "T", "ünï"]


async def test_times_come_back_to_the_microsecond(
    pg_url: str, make_settings: Callable[..., Settings], client: NATS
) -> None:
    # Times travel to the staging table as integer microseconds and are turned
    # back in SQL: the edges (before the epoch, odd microseconds) must survive.
    times = [
        "1900-01-01T00:00:00.000001+00:00",
        "1969-12-31T23:59:59.999999+00:00",
        "1970-01-01T00:00:00+00:00",
        "2024-02-29T12:34:56.789012+00:00",
    ]
    async with StoreService(make_settings(database_url=pg_url)):
        reply = await client.request(
            "mdp.store.write.trades",
            json.dumps([trade(ts=t) for t in times]).encode(),
            timeout=5,
        )
        assert json.loads(reply.data)["accepted"] == len(times)
    conn = await asyncpg.connect(pg_url)
    try:
        recs = await conn.fetch("SELECT ts, ingested_at, now() - ingested_at AS age FROM trades")
    finally:
        await conn.close()
    assert sorted(r["ts"].isoformat() for r in recs) == times
    assert all(timedelta(0) <= r["age"] < timedelta(minutes=5) for r in recs)


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    sink = PostgresSink(pg_url)
    await sink.open()
    await sink.close()
    conn = await asyncpg.connect(pg_url)
    await conn.execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    await conn.close()
    with pytest.raises(SchemaError, match="schema version 99"):
        await PostgresSink(pg_url).open()


async def test_schema_creation_is_idempotent_and_concurrent(pg_url: str) -> None:
    sinks = [PostgresSink(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in sinks))
    try:
        assert await sinks[0].counts() == {"bars": 0, "trades": 0, "quotes": 0, "options": 0}
    finally:
        for s in sinks:
            await s.close()
    conn = await asyncpg.connect(pg_url)
    try:
        versions = await conn.fetch("SELECT value FROM store_meta WHERE key = 'schema_version'")
    finally:
        await conn.close()
    assert [r["value"] for r in versions] == ["1"]


@pytest.mark.slow
async def test_outage_then_recovery_stores_everything_once(
    make_settings: Callable[..., Settings], client: NATS, pg_server: PostgresServer, pg_url: str
) -> None:
    """Stop PostgreSQL mid-stream, keep publishing with replies, start it again."""
    settings = make_settings(database_url=pg_url, sink_retry_initial_s=0.05, sink_retry_max_s=0.5)
    async with StoreService(settings) as svc:
        answered: list[int] = []

        async def publisher() -> None:
            for i in range(200):
                payload = json.dumps([trade(symbol=f"S{i}", size=j) for j in range(5)]).encode()
                while True:  # a publisher that retries until its write is confirmed
                    try:
                        reply = await client.request("mdp.store.write.trades", payload, timeout=2)
                    except Exception:
                        continue
                    if not reply.headers:
                        break
                    await asyncio.sleep(0.05)
                answered.append(i)

        task = asyncio.create_task(publisher())
        await until(lambda: len(answered) >= 20)
        await asyncio.to_thread(pg_server.stop, "immediate")
        await until(lambda: not svc.batcher.sink_ok, timeout=20)
        health: Any = HealthStatus.model_validate_json(
            (await client.request("mdp.store.health", b"", timeout=2)).data
        )
        assert health.state == "unhealthy"
        ready = await client.request("mdp.store.ready", b"", timeout=2)
        assert ready.headers is not None
        assert ready.headers["Nats-Service-Error-Code"] == "503"
        stuck = len(answered)
        await asyncio.sleep(0.5)
        assert len(answered) <= stuck + 1, "no write is confirmed while the database is down"
        await asyncio.to_thread(pg_server.start)
        await asyncio.wait_for(task, 120)
        await until(lambda: svc.batcher.sink_ok)
        counts = await svc.sink.counts()
    assert counts["trades"] == 200 * 5, "every confirmed record stored exactly once"
