"""TimescaleDB, as a desk runs it: a server that preloads it (hypertables per kind,
chunk intervals, no extra time index, big tables converted outside any statement
timeout) and one where it is installed but not preloaded (plain tables, one warning,
the service runs). They need TimescaleDB installed in this machine's PostgreSQL
(built from source here); without it they are skipped, saying so."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from store_svc.core import HealthStatus
from store_svc.devtools.pgserver import PostgresServer, has_extension
from store_svc.errors import SinkError
from store_svc.kinds import KINDS
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings
from store_svc.store import timescale
from store_svc.store.postgres import PostgresSink

from .test_bad_input import trade

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not has_extension("timescaledb"),
        reason="TimescaleDB is not installed in this machine's PostgreSQL "
        "(docs/operations.md, 'TimescaleDB', says how to build it)",
    ),
]


@pytest.fixture(scope="module")
def ts_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server that preloads TimescaleDB."""
    server = PostgresServer(preload=("timescaledb",)).start()
    yield server
    server.close()


async def _fresh(server: PostgresServer) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.dsn)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    return server.url(name)


@pytest.fixture
async def ts_url(ts_server: PostgresServer) -> str:
    return await _fresh(ts_server)


async def _hypertables(url: str) -> dict[str, timedelta]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions"
        )
    finally:
        await conn.close()
    return {r["hypertable_name"]: r["time_interval"] for r in rows}


async def _indexes(url: str, table: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = $1", table)
    finally:
        await conn.close()
    return sorted(r["indexname"] for r in rows)


async def test_preloaded_hypertables_per_kind_without_a_time_index(
    ts_url: str, make_settings: Callable[..., Settings], client: NATS
) -> None:
    settings = make_settings(
        database_url=ts_url, chunk_interval_trades="12h", chunk_interval_bars="30d"
    )
    async with StoreService(settings):
        reply = await client.request(
            "mdp.store.write.trades", json.dumps(trade(symbol="TS")).encode(), timeout=10
        )
        assert json.loads(reply.data)["accepted"] == 1
        health = await client.request("mdp.store.health", b"", timeout=10)
        sink = next(
            c for c in HealthStatus.model_validate_json(health.data).components if c.name == "sink"
        )
        assert sink.details["layout"] == "hypertables"
        page = await client.request("mdp.store.query.trades", b'{"symbol": "TS"}', timeout=10)
        assert len(json.loads(page.data)["records"]) == 1
    assert await _hypertables(ts_url) == {
        "bars": timedelta(days=30),
        "trades": timedelta(hours=12),
        "quotes": timedelta(days=1),
        "options": timedelta(days=1),
    }
    for kind in KINDS:
        # Only the key's index: no TimescaleDB default index on the time column.
        names = await _indexes(ts_url, kind)
        assert len(names) == 1, names
        assert not names[0].endswith(f"_{KINDS[kind].time_column}_idx"), names


async def test_a_changed_chunk_interval_applies_to_new_chunks(ts_url: str) -> None:
    async with PostgresSink(ts_url, chunk_intervals=_intervals(trades=timedelta(days=1))):
        pass
    async with PostgresSink(ts_url, chunk_intervals=_intervals(trades=timedelta(hours=6))) as s:
        assert s.details() == {"layout": "hypertables"}
    assert (await _hypertables(ts_url))["trades"] == timedelta(hours=6)


def _intervals(**kinds: timedelta) -> dict[str, timedelta]:
    base = {"bars": timedelta(days=7), "trades": timedelta(days=1)}
    return {"quotes": timedelta(days=1), "options": timedelta(days=1), **base, **kinds}


async def _plain_trades(url: str, rows: int) -> None:
    """Plain tables (as an earlier version or STORE_TIMESCALEDB=off left them) with
    ``rows`` trades over 30 days."""
    async with PostgresSink(url, timescaledb="off"):
        pass
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO trades (symbol, ts, price, size, exchange, conditions, ingested_at) "
            "SELECT 'S' || (g % 50), timestamptz '2024-01-01' + g * interval '2.592 s' * "
            f"(1000000.0 / {rows}), 1.5, g, 'X', '{{}}', now() "
            f"FROM generate_series(1, {rows}) AS g"
        )
    finally:
        await conn.close()


async def test_a_big_table_is_converted_outside_the_statement_timeout_with_progress(
    ts_url: str, make_settings: Callable[..., Settings], client: NATS
) -> None:
    """600,000 trades take seconds to convert: far past the 0.2 s statement timeout of
    the sink's own connections (the earlier start-up ran the conversion under its
    60 s timeout, and a big table was never converted). Health says what is going on
    meanwhile, and readiness gives it as the reason."""
    await _plain_trades(ts_url, 600_000)
    settings = make_settings(database_url=ts_url)
    sink = PostgresSink(ts_url, chunk_intervals=settings.chunk_intervals, command_timeout_s=0.2)
    svc = StoreService(settings, sink=sink)
    starting = asyncio.create_task(svc.start())
    seen: list[str] = []
    try:
        while not starting.done():
            try:
                reply = await client.request("mdp.store.ready", b"", timeout=1)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            reason = (reply.headers or {}).get("Nats-Service-Error", "")
            if "converting trades (600,000 rows)" in reason:
                seen.append(reason)
            await asyncio.sleep(0.05)
        await starting
        assert seen, "readiness never said a conversion was under way"
        assert svc.sink.details() == {"layout": "hypertables"}
        assert (await sink.counts())["trades"] == 600_000
    finally:
        await svc.stop()
    hypertables = await _hypertables(ts_url)
    assert hypertables["trades"] == timedelta(days=1)
    conn = await asyncpg.connect(ts_url)
    chunks = await conn.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'trades'"
    )
    await conn.close()
    assert chunks >= 30  # 30 days of trades in daily chunks


async def test_a_failed_conversion_names_the_rows_and_the_manual_command(ts_url: str) -> None:
    await _plain_trades(ts_url, 2_000)
    conn = await asyncpg.connect(ts_url)
    # A unique index without the time column: TimescaleDB cannot partition the table.
    await conn.execute("CREATE UNIQUE INDEX trades_one_per_size ON trades (size)")
    await conn.close()
    with pytest.raises(SinkError) as failed:
        await PostgresSink(ts_url).open()
    text = str(failed.value)
    assert "converting trades (2,000 rows) into a hypertable failed" in text
    assert "create_hypertable('trades', 'ts'" in text
    assert "STORE_TIMESCALEDB=off" in text
    assert not failed.value.retryable
    assert "trades" not in await _hypertables(ts_url)  # nothing changed


async def test_an_earlier_versions_default_time_index_is_dropped(ts_url: str) -> None:
    async with PostgresSink(ts_url, timescaledb="off"):
        pass
    conn = await asyncpg.connect(ts_url)
    await conn.execute("CREATE EXTENSION timescaledb")
    await conn.execute("SELECT create_hypertable('trades', 'ts')")  # default index made
    await conn.close()
    assert "trades_ts_idx" in await _indexes(ts_url, "trades")
    async with PostgresSink(ts_url):
        pass
    assert "trades_ts_idx" not in await _indexes(ts_url, "trades")


async def test_off_leaves_a_preloaded_server_on_plain_tables(ts_url: str) -> None:
    async with PostgresSink(ts_url, timescaledb="off") as sink:
        assert sink.details() == {"layout": "plain", "timescaledb": "STORE_TIMESCALEDB=off"}
    conn = await asyncpg.connect(ts_url)
    created = "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
    assert await conn.fetchval(created) == 0
    await conn.close()


# --- installed but not preloaded (the project's usual PostgreSQL server) ------------


async def test_installed_not_preloaded_runs_on_plain_tables_with_one_warning(
    pg_url: str,
    make_settings: Callable[..., Settings],
    client: NATS,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(timescale, "_warned_not_preloaded", False)  # as in a new process
    for symbol in ("PL1", "PL2"):  # two starts, one warning
        async with StoreService(make_settings(database_url=pg_url)) as svc:
            reply = await client.request(
                "mdp.store.write.trades", json.dumps(trade(symbol=symbol)).encode(), timeout=10
            )
            assert json.loads(reply.data)["accepted"] == 1
            assert svc.sink.details() == {
                "layout": "plain",
                "timescaledb": "timescaledb is installed but not preloaded",
            }
    assert caplog.text.count("timescaledb is installed but not preloaded: the tables") == 1


async def test_require_without_the_preload_ends_start_up_saying_what_to_do(pg_url: str) -> None:
    with pytest.raises(SinkError, match="shared_preload_libraries"):
        await PostgresSink(pg_url, timescaledb="require").open()


async def test_retention_drops_whole_chunks_in_bounded_steps(ts_url: str) -> None:
    """40 daily chunks of old trades (more than one step's 16), never analysed: every
    one goes, in three steps, with its rows counted exactly; the recent ones stay."""
    from .test_retention import NOW, old_and_new

    async with PostgresSink(ts_url, expiring=frozenset({"trades"})) as sink:
        await sink.write({"trades": old_and_new(4_000, 100, spread=timedelta(days=40))})
        conn = await asyncpg.connect(ts_url)
        chunks = "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = $1"
        before = await conn.fetchval(chunks, "trades")
        removed = await sink.expire_pass({"trades": NOW - timedelta(days=1)}, 1_000, 0)
        after = await conn.fetchval(chunks, "trades")
        await conn.close()
        assert before >= 40
        assert after <= 2  # today's (and yesterday's) chunk
        assert removed == {"trades": 4_000}
        assert (await sink.counts())["trades"] == 100
    # Hypertables drop chunks: no time index is made for retention.
    assert len(await _indexes(ts_url, "trades")) == 1


async def test_off_refuses_tables_that_are_hypertables_already(ts_url: str) -> None:
    async with PostgresSink(ts_url):
        pass
    with pytest.raises(SinkError, match="hypertables already: set STORE_TIMESCALEDB=auto"):
        await PostgresSink(ts_url, timescaledb="off").open()


async def test_a_database_with_the_extension_on_a_server_without_the_preload() -> None:
    """Hypertables made on a preloading server, which then restarts without the
    preload: every mode ends start-up saying what to do (it used to end with
    "the underlying connection is closed")."""
    server = PostgresServer(preload=("timescaledb",)).start()
    try:
        url = await _fresh(server)
        async with PostgresSink(url):
            pass
        server.stop()
        server.preload = ()
        server.start()
        for mode in ("auto", "require", "off"):
            with pytest.raises(SinkError, match="does not preload it") as refused:
                await PostgresSink(url, timescaledb=mode).open()  # type: ignore[arg-type]
            assert not refused.value.retryable
    finally:
        server.close()
