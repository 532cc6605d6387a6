"""The ingest path against a real nats-server and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import barrier, trade


def bar(**changes: Any) -> dict[str, Any]:
    return {
        "symbol": "MSFT",
        "ts": "2024-05-01T13:31:00Z",
        "resolution": "1m",
        "open": "410.1",
        "high": "411",
        "low": "409.95",
        "close": "410.5",
        "volume": "12000",
        **changes,
    }


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@contextmanager
def locked(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock, as a stuck writer or a full disk would."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def test_reply_comes_only_after_rows_are_visible(
    service: StoreService, client: NATS, db_path: Path
) -> None:
    records = [trade(symbol=f"S{i}") for i in range(250)]
    reply = await client.request("mdp.store.write.trades", json.dumps(records).encode(), timeout=5)
    # Read with a separate connection the moment the reply lands.
    assert count(db_path, "trades") == 250
    assert json.loads(reply.data) == {"accepted": 250, "rejected": 0, "errors": []}


async def test_reply_waits_for_a_stalled_database(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    async with StoreService(make_settings(sink_retry_initial_s=0.05, sink_retry_max_s=0.2)) as svc:
        with locked(db_path):
            pending = asyncio.ensure_future(
                client.request("mdp.store.write.trades", json.dumps(trade()).encode(), timeout=30)
            )
            await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
            assert not pending.done(), "a write was acknowledged before it was committed"
        reply = await pending
        assert json.loads(reply.data)["accepted"] == 1
        assert count(db_path, "trades") == 1
        assert svc.stats.last_sink_error is None


async def test_same_message_twice_is_one_row(
    service: StoreService, client: NATS, db_path: Path
) -> None:
    payload = json.dumps([trade(symbol="DUP", exchange=None), trade(symbol="DUP", size=5)]).encode()
    for _ in range(3):
        await client.publish("mdp.store.write.trades", payload)
    bars = json.dumps([bar(), bar(ts="2024-05-01T13:32:00Z")]).encode()
    await client.publish("mdp.store.write.bars", bars)
    await client.publish("mdp.store.write.bars", bars)
    await barrier(client)
    assert count(db_path, "trades") == 3  # two distinct trades and the barrier
    assert count(db_path, "bars") == 2


async def test_equal_decimals_are_one_trade_key(
    service: StoreService, client: NATS, db_path: Path
) -> None:
    await client.publish("mdp.store.write.trades", json.dumps(trade(price="1.5")).encode())
    await client.publish("mdp.store.write.trades", json.dumps(trade(price="1.50")).encode())
    await client.publish("mdp.store.write.trades", json.dumps(trade(price=1.5)).encode())
    await barrier(client)
    prices = [r[2] for r in await service.sink.rows("trades") if r[0] == "AAPL"]
    assert prices == [Decimal("1.5")]


async def test_corrected_bar_replaces_the_old_one(service: StoreService, client: NATS) -> None:
    await client.publish("mdp.store.write.bars", json.dumps(bar(close="1")).encode())
    await client.publish("mdp.store.write.bars.MSFT", json.dumps(bar(close="2.25")).encode())
    await barrier(client)
    rows = await service.sink.rows("bars")
    assert [(r[0], r[6]) for r in rows] == [("MSFT", Decimal("2.25"))]


async def test_every_kind_lands_in_its_own_table(
    service: StoreService, client: NATS, db_path: Path
) -> None:
    await client.publish("mdp.store.write.bars", json.dumps(bar()).encode())
    await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
    await client.publish(
        "mdp.store.write.quotes",
        json.dumps({"symbol": "AAPL", "bid": "1", "ask": "1.01", "timestamp": 1714570200}).encode(),
    )
    option = {"symbol": "AAPL", "expiry": "2026-01-16", "strike": "200", "option_type": "C"}
    await client.publish(
        "mdp.store.write.options", json.dumps(option).encode(), headers={"Md-Ts": "1714570200.25"}
    )
    await client.publish("mdp.store.write.options", json.dumps(option).encode())  # ts = receipt
    await barrier(client)
    counts = await service.sink.counts()
    assert counts == {"bars": 1, "trades": 2, "quotes": 1, "options": 2}
    with sqlite3.connect(db_path) as conn:
        ts = [r[0] for r in conn.execute("SELECT ts FROM options ORDER BY ts")]
        quote_ts = conn.execute("SELECT timestamp FROM quotes").fetchone()[0]
    assert ts[0] == 1_714_570_200_250_000  # microseconds since the epoch, UTC
    assert quote_ts == 1_714_570_200_000_000


async def test_a_full_queue_makes_intake_wait_and_loses_nothing(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    settings = make_settings(queue_capacity=50, batch_size=20, flush_interval_ms=5)
    async with StoreService(settings) as svc:
        with locked(db_path):
            for i in range(400):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            # Full: the next envelope (up to a quarter of the queue) does not fit.
            await until(lambda: svc.queue.depth > 50 - 50 // 4, timeout=20)
            assert svc.queue.depth <= settings.queue_capacity
        await barrier(client)
        assert svc.stats.dropped_messages == 0
    assert count(db_path, "trades") == 401


async def test_slow_consumer_drops_are_counted(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path, caplog: Any
) -> None:
    settings = make_settings(
        queue_capacity=10, batch_size=10, nats_pending_msgs_limit=20, sink_retry_max_s=0.2
    )
    async with StoreService(settings) as svc:
        with locked(db_path):
            for i in range(300):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: svc.stats.dropped_messages > 0, timeout=20)
        intake: Any = svc._intake
        # Let the client's buffer empty, so the barrier itself is not dropped.
        await until(lambda: intake.pending_msgs == 0 and svc.queue.depth == 0, timeout=20)
        await barrier(client)
        stored = count(db_path, "trades") - 1
        assert stored + svc.stats.dropped_messages == 300, "every message is stored or counted"
        assert stored == svc.stats.accepted["trades"] - 1
        # Visible to operators: in health and in the micro service's stats.
        health = json.loads((await client.request("mdp.store.health", b"", timeout=2)).data)
        (intake,) = [c for c in health["components"] if c["name"] == "intake"]
        assert intake["details"]["dropped"] == str(svc.stats.dropped_messages)
        stats = json.loads((await client.request("$SRV.STATS.market-data-store", b"", 2)).data)
        (endpoint,) = [e for e in stats["endpoints"] if e["name"] == "health"]
        assert str(endpoint["data"]["dropped"]) == str(svc.stats.dropped_messages)
    assert "slow consumer" in caplog.text


async def test_linger_flushes_a_lone_record(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(batch_size=1000, flush_interval_ms=20)) as svc:
        await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
        await until(lambda: svc.stats.committed["trades"] == 1)
        assert svc.stats.batches == 1


async def test_queue_group_is_used(service: StoreService) -> None:
    sub = service._intake.subscription if service._intake else None
    assert sub is not None
    assert sub.subject == "mdp.store.write.>"
    assert sub.queue == "store"


async def test_subject_prefix_is_a_setting(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    async with StoreService(make_settings(subject_prefix="desk1.md")):
        reply = await client.request(
            "desk1.md.store.write.trades", json.dumps(trade()).encode(), timeout=5
        )
        assert json.loads(reply.data)["accepted"] == 1


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/nested/dir/x.db", "sqlite:///{tmp}/x.db"])
async def test_database_folder_is_created(
    make_settings: Callable[..., Settings], tmp_path: Path, url: str
) -> None:
    async with StoreService(make_settings(database_url=url.format(tmp=tmp_path))) as svc:
        assert svc.sink.path.exists()  # type: ignore[attr-defined]


async def test_several_nats_urls(
    make_settings: Callable[..., Settings], nats_server: Any, client: NATS
) -> None:
    urls = f"nats://127.0.0.1:1, {nats_server.url}"
    async with StoreService(make_settings(nats_url=urls, nats_connect_timeout_s=10)):
        reply = await client.request(
            "mdp.store.write.trades", json.dumps(trade()).encode(), timeout=5
        )
        assert json.loads(reply.data)["accepted"] == 1


async def test_a_killed_writer_process_is_replaced_and_nothing_is_lost(
    service: StoreService, client: NATS, db_path: Path
) -> None:
    sink: Any = service.sink
    first = sink.pid
    assert first is not None
    await barrier(client, "BEFORE")
    os.kill(first, signal.SIGKILL)
    for i in range(20):
        await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
    body = await barrier(client, "AFTER")
    assert body["accepted"] == 1
    assert sink.pid not in (None, first)
    assert count(db_path, "trades") == 22


async def test_a_message_the_database_refuses_costs_only_itself(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    """A burst of request-reply writes, taken off the connection together, one of
    which the database refuses (a trigger): only that one is refused and unstored."""
    async with StoreService(make_settings()) as svc:
        with sqlite3.connect(db_path) as conn:
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON trades WHEN NEW.symbol = 'POISON' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        inbox = client.new_inbox()
        replies: dict[str, Any] = {}

        async def on_reply(msg: Any) -> None:
            replies[msg.subject.rpartition(".")[2]] = msg

        await client.subscribe(inbox + ".*", cb=on_reply)
        with locked(db_path):  # the burst queues up behind a held lock
            for i in range(200):
                symbol = "POISON" if i == 100 else "OK"
                body = json.dumps(trade(symbol=symbol, size=i + 1)).encode()
                await client.publish("mdp.store.write.trades", body, reply=f"{inbox}.{i}")
            await client.flush()
            await until(lambda: svc.stats.accepted["trades"] == 200, timeout=20)
        await until(lambda: len(replies) == 200, timeout=20)
    poisoned = replies.pop("100")
    assert poisoned.headers["Nats-Service-Error-Code"] == "500"
    assert all(json.loads(m.data)["accepted"] == 1 for m in replies.values())
    assert count(db_path, "trades") == 199
