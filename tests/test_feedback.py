"""Backpressure feedback on a real nats-server: levels, heartbeat, 503, contract."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from store_svc.bus.client import OrderedFlushClient
from store_svc.control.feedback import FeedbackLoop, NatsFeedbackPublisher
from store_svc.core import BackpressureLevel, FeedbackEvent, FeedbackPublisher, RateAdjustment
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import checked, until
from .test_bad_input import barrier, trade
from .test_ingest import count, locked

OK, SOFT, HARD = BackpressureLevel.ok, BackpressureLevel.soft, BackpressureLevel.hard
SUBJECT = "mdp.telemetry.feedback"


def levels(events: list[FeedbackEvent]) -> list[BackpressureLevel]:
    return [e.level for e in events]


async def test_a_stalled_sink_drives_ok_soft_hard_soft_ok(
    make_settings: Callable[..., Settings],
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
) -> None:
    settings = make_settings(
        queue_capacity=100,
        batch_size=10,
        flush_interval_ms=1,
        feedback_min_dwell_ms=50,
        feedback_heartbeat_s=600,
        coordinator_id="store-test-1",
    )
    async with StoreService(settings) as svc:
        await until(lambda: levels(feedback) == [OK])
        with locked(db_path):
            for i in range(120):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: HARD in levels(feedback))
        await until(lambda: levels(feedback)[-1] is OK and svc.queue.depth == 0)
    await until(lambda: len(feedback) == 6)
    assert levels(feedback) == [OK, SOFT, HARD, SOFT, OK, OK]  # announce, changes, final
    start, soft_up, hard, soft_down, ok_down, final = feedback
    assert start.queue_size == 0
    assert soft_up.queue_size >= 50
    assert hard.queue_size >= 80
    assert soft_down.queue_size < 70
    assert ok_down.queue_size < 40
    assert final.queue_size == 0
    assert all(e.capacity == 100 and e.coordinator_id == "store-test-1" for e in feedback)
    assert count(db_path, "trades") == 120


async def test_oscillation_inside_the_dwell_sends_nothing_extra(
    make_settings: Callable[..., Settings], client: NATS, feedback: list[FeedbackEvent]
) -> None:
    loop = FeedbackLoop(
        make_settings(queue_capacity=100, batch_size=10, feedback_min_dwell_ms=60_000),
        100,
        NatsFeedbackPublisher(client, SUBJECT),
    )
    task = asyncio.create_task(loop.run())
    try:
        for depth in [10, 49, 50, 45, 39, 51, 30, 60, 38, 55, 0]:
            loop.on_depth(depth)
            await asyncio.sleep(0.01)
        await client.flush()
        await until(lambda: len(feedback) >= 1)
        await asyncio.sleep(0.2)  # give any extra event the time to show up
        assert levels(feedback) == [SOFT]
    finally:
        task.cancel()
        loop.close()


async def test_a_late_subscriber_learns_the_level_within_a_heartbeat(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(feedback_heartbeat_s=0.3)):
        await asyncio.sleep(0.5)  # join late
        got: asyncio.Future[FeedbackEvent] = asyncio.get_running_loop().create_future()

        async def first(msg: Msg) -> None:
            if not got.done():
                got.set_result(checked(msg))

        joined = asyncio.get_running_loop().time()
        await client.subscribe(SUBJECT, cb=first)
        event = await asyncio.wait_for(got, 2.0)
        assert asyncio.get_running_loop().time() - joined <= 0.3 + 0.2
        assert event.level is OK


async def test_feedback_keeps_flowing_after_nats_restarts(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    server = NatsServer().start()
    port = server.port
    try:
        settings = make_settings(nats_url=server.url, feedback_heartbeat_s=0.2)
        async with StoreService(settings) as svc:
            watcher = OrderedFlushClient()
            got: list[FeedbackEvent] = []

            async def collect(msg: Msg) -> None:
                got.append(checked(msg))

            await watcher.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
            await watcher.subscribe(SUBJECT, cb=collect)
            await until(lambda: len(got) >= 2)
            server.stop()
            server = NatsServer(port=port).start()
            before = len(got)
            await until(lambda: len(got) >= before + 3, timeout=20)
            assert svc.nc is not None
            assert svc.nc.is_connected
            await watcher.close()
    finally:
        server.stop()


async def test_request_reply_writes_get_503_at_hard_and_succeed_after(
    make_settings: Callable[..., Settings],
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
) -> None:
    settings = make_settings(
        queue_capacity=50, batch_size=10, feedback_min_dwell_ms=50, feedback_heartbeat_s=600
    )
    async with StoreService(settings) as svc:
        payload = json.dumps(trade(symbol="REQ")).encode()
        with locked(db_path):
            for i in range(60):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: svc.feedback.level is HARD)
            reply = await client.request("mdp.store.write.trades", payload, timeout=5)
            assert reply.headers is not None
            assert reply.headers["Nats-Service-Error-Code"] == "503"
            assert reply.headers["Nats-Service-Error"].startswith("overloaded")
            assert int(reply.headers["Store-Retry-After-Ms"]) > 0
            assert svc.stats.refused_overload == 1
        await until(lambda: svc.feedback.level is OK)
        reply = await client.request("mdp.store.write.trades", payload, timeout=10)
        assert json.loads(reply.data)["accepted"] == 1
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM trades WHERE symbol = 'REQ'").fetchone()[0] == 1
    assert count(db_path, "trades") == 61


async def test_another_publisher_can_be_given(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.events: list[FeedbackEvent] = []

        async def publish(self, event: FeedbackEvent) -> None:
            self.events.append(event)

    recorder = Recorder()
    assert isinstance(recorder, FeedbackPublisher)
    assert isinstance(NatsFeedbackPublisher(client, SUBJECT), FeedbackPublisher)
    async with StoreService(make_settings(), feedback_publisher=recorder):
        await barrier(client)
    assert levels(recorder.events) == [OK, OK]


async def test_the_documented_consumer_turns_feedback_into_rate_adjustments(
    make_settings: Callable[..., Settings], nats_server: NatsServer, db_path: Path, client: NATS
) -> None:
    path = Path(__file__).parents[1] / "docs" / "examples" / "feedback_consumer.py"
    spec = importlib.util.spec_from_file_location("feedback_consumer", path)
    assert spec is not None
    assert spec.loader is not None
    example: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    adjustments: list[RateAdjustment] = []
    stop = asyncio.Event()
    consumer = asyncio.create_task(example.follow(nats_server.url, adjustments.append, stop=stop))
    await asyncio.sleep(0.3)  # let it subscribe before the store announces itself
    settings = make_settings(
        queue_capacity=50, batch_size=10, feedback_min_dwell_ms=50, feedback_heartbeat_s=600
    )
    async with StoreService(settings) as svc:
        with locked(db_path):
            for i in range(60):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: svc.feedback.level is HARD)
        await until(lambda: svc.feedback.level is OK)
    await until(lambda: len(adjustments) >= 6)
    stop.set()
    await consumer
    assert [(a.reason, a.scale) for a in adjustments[:5]] == [
        (OK, 1.0),
        (SOFT, 0.5),
        (HARD, 0.0),
        (SOFT, 0.5),
        (OK, 1.0),
    ]
    assert all(isinstance(a, RateAdjustment) and a.provider == "synthetic" for a in adjustments)


async def test_a_failing_database_holds_feedback_at_hard_until_it_recovers(
    make_settings: Callable[..., Settings],
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
) -> None:
    settings = make_settings(
        sink_retry_initial_s=0.05,
        sink_retry_max_s=0.2,
        feedback_min_dwell_ms=50,
        feedback_heartbeat_s=600,
    )
    async with StoreService(settings) as svc:
        with locked(db_path):
            await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
            await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
            await until(lambda: HARD in levels(feedback))
            assert svc.queue.depth < svc.feedback.marks.soft, "hard from the outage, not depth"
            reply = await client.request(
                "mdp.store.write.trades", json.dumps(trade(symbol="X")).encode(), timeout=5
            )
            assert reply.headers is not None
            assert reply.headers["Nats-Service-Error-Code"] == "503"
        await until(lambda: levels(feedback)[-1] is OK, timeout=20)
    assert levels(feedback) == [OK, SOFT, HARD, SOFT, OK, OK]
