"""Feedback on Core's Redis event bus, heard by Core's own consumer, with a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from market_data_core.events import EventEnvelope, create_event_bus
from market_data_core.telemetry import FeedbackEvent, RateAdjustment
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from store_svc.control.feedback import FeedbackLoop
from store_svc.control.redis_feedback import BUFFER_EVENTS, RedisFeedbackPublisher
from store_svc.core import BackpressureLevel, FeedbackPublisher
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings
from store_svc.tasks import cancel_and_wait

from .conftest import until, until_async
from .redis_server import RedisServer
from .test_bad_input import trade
from .test_ingest import count, locked

OK, SOFT, HARD = BackpressureLevel.ok, BackpressureLevel.soft, BackpressureLevel.hard


@contextlib.asynccontextmanager
async def core_consumer(
    url: str, group: str = "pipeline", consumer: str = "t1"
) -> AsyncIterator[list[EventEnvelope[Any]]]:
    """Core's own bus consumer on ``telemetry.feedback``, as a pipeline would run it."""
    bus = create_event_bus(backend="redis", redis_url=url)
    heard: list[EventEnvelope[Any]] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        stream = bus.subscribe("telemetry.feedback", group=group, consumer=consumer)
        first = asyncio.ensure_future(anext(stream))
        # The group exists once the subscription has sent XGROUP CREATE.
        await until_async_group(url, group)
        subscribed.set()
        heard.append(await first)
        async for envelope in stream:
            heard.append(envelope)

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()
        yield heard
    finally:
        await cancel_and_wait(task)
        await bus.close()  # type: ignore[union-attr]  # the redis backend was asked for


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Any]:
    """A plain redis-py client, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def writing(publisher: RedisFeedbackPublisher) -> AsyncIterator[None]:
    """``publisher``'s writing task for the block; its client closed afterwards."""
    task = asyncio.create_task(publisher.run())
    try:
        yield
    finally:
        await cancel_and_wait(task)
        await publisher.close()


async def until_async_group(url: str, group: str) -> None:
    async with redis_client(url) as client:
        for _ in range(200):
            try:
                groups = await client.xinfo_groups("mdp:telemetry.feedback")
            except redis.ResponseError:
                groups = []
            if any(g["name"] in (group, group.encode()) for g in groups):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"group {group} never appeared")


def changes(events: list[FeedbackEvent]) -> list[BackpressureLevel]:
    """The levels of ``events`` with repeats (heartbeats) left out."""
    out: list[BackpressureLevel] = []
    for e in events:
        if not out or e.level is not out[-1]:
            out.append(e.level)
    return out


async def flood(client: NATS, n: int) -> None:
    for i in range(n):
        await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
    await client.flush()


def payloads(heard: list[EventEnvelope[Any]]) -> list[FeedbackEvent]:
    events = [e.payload for e in heard]
    assert all(isinstance(e, FeedbackEvent) for e in events)
    return events


def redis_settings(make_settings: Callable[..., Settings], url: str, **more: Any) -> Settings:
    return make_settings(
        feedback_redis_url=url,
        queue_capacity=100,
        batch_size=10,
        flush_interval_ms=1,
        feedback_min_dwell_ms=50,
        coordinator_id="store-redis-1",
        **more,
    )


async def test_cores_consumer_hears_every_level_change_and_heartbeat(
    make_settings: Callable[..., Settings],
    redis_server: RedisServer,
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
) -> None:
    async with core_consumer(redis_server.url) as heard:
        settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=0.3)
        async with StoreService(settings) as svc:
            await until(lambda: len(heard) >= 2)  # the start-up event and a heartbeat
            with locked(db_path):
                for i in range(120):
                    await client.publish(
                        "mdp.store.write.trades", json.dumps(trade(size=i)).encode()
                    )
                await client.flush()
                await until(lambda: HARD in [e.level for e in payloads(heard)])
            await until(lambda: payloads(heard)[-1].level is OK and svc.queue.depth == 0)
            component = _component(svc)
    events = payloads(heard)
    assert changes(events) == [OK, SOFT, HARD, SOFT, OK]
    assert all(e.coordinator_id == "store-redis-1" and e.source == "store" for e in events)
    assert all(
        e.meta.schema_id == "telemetry.FeedbackEvent" and e.meta.track == "v1" for e in heard
    )
    assert all(e.key == "store-redis-1" for e in heard)
    assert count(db_path, "trades") == 120
    # NATS heard the same changes.
    assert changes(feedback) == [OK, SOFT, HARD, SOFT, OK]
    assert component.state == "healthy"
    assert component.details["stream"] == "mdp:telemetry.feedback"
    assert int(component.details["published"]) >= 5


async def test_the_stream_is_capped(redis_server: RedisServer) -> None:
    publisher = RedisFeedbackPublisher(redis_server.url, "capped", maxlen=100)
    async with writing(publisher):
        for i in range(2000):
            await publisher.publish(event(i))
            if i % 200 == 0:
                await publisher.flush(10)
        assert await publisher.flush(10)
    async with redis_client(redis_server.url) as client:
        length = await client.xlen("capped:telemetry.feedback")
    assert publisher.published + publisher.dropped == 2000
    # MAXLEN ~ trims whole macro nodes (100 entries each by default), never below 100.
    assert 100 <= length <= 300, length


def event(i: int, level: BackpressureLevel = OK) -> FeedbackEvent:
    return FeedbackEvent(
        coordinator_id="c", queue_size=i, capacity=10_000, level=level, source="store", ts=1.0 + i
    )


async def test_a_full_buffer_drops_the_oldest_and_counts_them(redis_server: RedisServer) -> None:
    publisher = RedisFeedbackPublisher(redis_server.url, "buffer", maxlen=10_000)
    for i in range(BUFFER_EVENTS + 44):
        await publisher.publish(event(i))  # nothing written yet: the task is not running
    assert publisher.dropped == 44
    async with writing(publisher):
        assert await publisher.flush(10)
    async with redis_client(redis_server.url) as client:
        entries = await client.xrange("buffer:telemetry.feedback")
    sizes = [json.loads(fields[b"data"])["payload"]["queue_size"] for _, fields in entries]
    assert sizes == list(range(44, BUFFER_EVENTS + 44)), "the newest kept, in order"


async def test_redis_stopped_and_restarted_mid_run(
    make_settings: Callable[..., Settings],
    redis_server: RedisServer,
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=0.2)
    caplog.set_level(logging.WARNING, logger="store_svc.control.redis_feedback")
    async with StoreService(settings) as svc:
        outlet = svc.redis_feedback
        assert outlet is not None
        await until(lambda: outlet.published >= 2)
        redis_server.stop()
        await until(lambda: outlet.up is False)
        await until(lambda: _component(svc).state == "degraded")
        assert _component(svc).details["reachable"] == "false"
        assert svc.snapshot.current()[1], "readiness does not depend on Redis"
        # Ingest and NATS feedback go on meanwhile.
        before = len(feedback)
        reply = await client.request(
            "mdp.store.write.trades", json.dumps(trade(size=7)).encode(), timeout=5
        )
        assert json.loads(reply.data)["accepted"] == 1
        await until(lambda: len(feedback) >= before + 3)
        published = outlet.published
        redis_server.start()
        async with core_consumer(redis_server.url) as heard:
            await until(lambda: len(heard) >= 2, timeout=15)
        await until(lambda: _component(svc).state == "healthy")
        assert outlet.published > published
        assert outlet.failures >= 1
    assert count(db_path, "trades") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach Redis" in line for line in lines) == 1, lines
    assert sum("reaches Redis" in line and "again" in line for line in lines) == 1, lines


def _component(svc: StoreService) -> Any:
    svc.snapshot.refresh()
    return next(c for c in svc.snapshot.current()[0].components if c.name == "feedback-redis")


async def test_redis_frozen_while_the_queue_goes_hard(
    make_settings: Callable[..., Settings],
    redis_server: RedisServer,
    client: NATS,
    feedback: list[FeedbackEvent],
    db_path: Path,
) -> None:
    settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=0.5)
    async with core_consumer(redis_server.url) as heard, StoreService(settings) as svc:
        outlet = svc.redis_feedback
        assert outlet is not None
        await until(lambda: len(heard) >= 1)
        redis_server.freeze()
        try:
            with locked(db_path):
                for i in range(120):
                    await client.publish(
                        "mdp.store.write.trades", json.dumps(trade(size=i)).encode()
                    )
                await client.flush()
                # NATS feedback is not held up by the frozen Redis.
                await until(lambda: HARD in [e.level for e in feedback], timeout=5)
                health = await client.request("mdp.store.health", b"", timeout=2)
                assert json.loads(health.data)["service"] == "market-data-store"
            await until(lambda: feedback[-1].level is OK and svc.queue.depth == 0)
            await until(lambda: outlet.up is False, timeout=10)
            assert count(db_path, "trades") == 120
        finally:
            redis_server.thaw()
        # What waited in the buffer arrives once Redis answers again.
        await until(lambda: HARD in [e.level for e in payloads(heard)], timeout=15)
        await until(lambda: payloads(heard)[-1].level is OK, timeout=15)
        await until(lambda: outlet.up is True, timeout=10)


async def test_shutdown_writes_the_final_state_to_redis(
    make_settings: Callable[..., Settings], redis_server: RedisServer
) -> None:
    settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=600)
    async with core_consumer(redis_server.url) as heard:
        async with StoreService(settings):
            await until(lambda: len(heard) == 1)  # the start-up announcement
        await until(lambda: len(heard) == 2)  # the final state
    assert [e.level for e in payloads(heard)] == [OK, OK]


class Flaky:
    """A NATS publisher that fails its first ``n`` attempts."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got: list[FeedbackEvent] = []

    async def publish(self, event: FeedbackEvent) -> None:
        if self.n > 0:
            self.n -= 1
            raise ConnectionError("not now")
        self.got.append(event)


class Collect:
    def __init__(self) -> None:
        self.got: list[FeedbackEvent] = []

    def offer(self, event: FeedbackEvent) -> None:
        self.got.append(event)


class Broken:
    def offer(self, event: FeedbackEvent) -> None:
        raise RuntimeError("broken outlet")


@pytest.mark.logic
async def test_outlets_hear_every_event_while_the_nats_publisher_fails() -> None:
    settings = load_settings(feedback_min_dwell_ms=0, feedback_heartbeat_s=600)
    primary, outlet = Flaky(2), Collect()
    loop = FeedbackLoop(settings, 100, primary)
    loop.outlets += [Broken(), outlet]
    await loop.announce()  # fails on NATS: kept for a retry
    loop.on_depth(60)  # soft
    loop.on_depth(90)  # hard
    await loop.announce()  # NATS fails again: everything is still pending there
    assert primary.got == []
    assert [e.level for e in outlet.got] == [OK, SOFT, HARD, HARD], "not held up by NATS"
    await loop.announce()  # NATS is back: it gets all, in order, each once
    assert [e.level for e in primary.got] == [OK, SOFT, HARD, HARD, HARD]
    assert len(outlet.got) == 5, "an outlet gets each event once, however often NATS retries"
    loop.close()


class FrozenRedis:
    """A stand-in for the client whose XADD hangs until released (Redis frozen)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail = True
        self.written: list[int] = []

    async def xadd(self, key: str, fields: dict[str, bytes], **_: Any) -> str:
        await self.release.wait()
        self.release.clear()
        if self.fail:
            raise TimeoutError("Timeout reading from socket")
        self.written.append(json.loads(fields["data"])["payload"]["queue_size"])
        return "1-0"

    async def aclose(self) -> None:
        pass


@pytest.mark.logic
@pytest.mark.parametrize("write_fails", [True, False])
async def test_the_drop_count_is_exact_and_never_goes_down(write_fails: bool) -> None:
    publisher = RedisFeedbackPublisher("redis://127.0.0.1:1/0", "mdp", maxlen=100)
    fake = FrozenRedis()
    publisher._redis = fake
    task = asyncio.create_task(publisher.run())
    publisher.offer(event(0))
    await asyncio.sleep(0)  # its write is under way, and hangs
    counts = []
    for i in range(1, BUFFER_EVENTS + 10):  # the one being written is pushed out too
        publisher.offer(event(i))
        counts.append(publisher.dropped)
    assert counts == sorted(counts), "a counter"
    fake.fail = write_fails
    fake.release.set()
    await until(lambda: fake.release.is_set() is False)
    await asyncio.sleep(0.01)
    # Event 0 was evicted while being written: dropped only when its write failed.
    assert publisher.dropped == (10 if write_fails else 9)
    fake.fail = False
    while publisher.buffered:
        fake.release.set()
        await asyncio.sleep(0)
    fake.release.set()
    await cancel_and_wait(task)
    written = set(fake.written)
    assert written == set(range(10, BUFFER_EVENTS + 10)) | (set() if write_fails else {0})
    assert publisher.published == len(fake.written)
    assert publisher.published + publisher.dropped == BUFFER_EVENTS + 10


@pytest.mark.logic
@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "nats://x:4222"])
def test_only_redis_urls_are_taken(url: str) -> None:
    with pytest.raises(ValidationError, match="redis://"):
        load_settings(feedback_redis_url=url)


@pytest.mark.logic
def test_credentials_stay_out_of_health() -> None:
    publisher = RedisFeedbackPublisher("redis://:s3cret@127.0.0.1:1/0", "mdp", maxlen=100)
    details = publisher.component().details
    assert "s3cret" not in json.dumps(details)
    assert details["url"] == "redis://127.0.0.1:1/0"
    assert details["reachable"] == "unknown"


async def start_pipeline(
    url: str, consumer: str
) -> tuple[list[RateAdjustment], asyncio.Event, asyncio.Task[None]]:
    """The documented pipeline, running, once its group exists."""
    example = load_example()
    adjustments: list[RateAdjustment] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        example.follow(url, adjustments.append, consumer=consumer, stop=stop)
    )
    await until_async_group(url, "pipeline")
    return adjustments, stop, task


def load_example() -> Any:
    path = Path(__file__).parents[1] / "docs" / "examples" / "pipeline_feedback.py"
    spec = importlib.util.spec_from_file_location("pipeline_feedback", path)
    assert spec is not None
    assert spec.loader is not None
    example: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


async def test_the_documented_pipeline_turns_redis_feedback_into_rate_adjustments(
    make_settings: Callable[..., Settings],
    redis_server: RedisServer,
    client: NATS,
    db_path: Path,
) -> None:
    adjustments, stop, pipeline = await start_pipeline(redis_server.url, "p1")
    settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=600)
    async with StoreService(settings) as svc:
        with locked(db_path):
            await flood(client, 120)
            await until(lambda: svc.feedback.level is HARD)
        await until(lambda: svc.feedback.level is OK)
    await until(lambda: len(adjustments) >= 6)
    stop.set()
    await pipeline
    assert [(a.reason, a.scale) for a in adjustments[:6]] == [
        (OK, 1.0),
        (SOFT, 0.5),
        (HARD, 0.0),
        (SOFT, 0.5),
        (OK, 1.0),
        (OK, 1.0),
    ]
    assert all(isinstance(a, RateAdjustment) and a.provider == "synthetic" for a in adjustments)
    # The pipeline acknowledged what it handled: nothing stays pending in its group.
    async with redis_client(redis_server.url) as r:
        pending = await r.xpending("mdp:telemetry.feedback", "pipeline")
    assert pending["pending"] == 0


# What the store works around in Core's bus, reproduced, so a Core release that
# changes it shows up here.


async def test_cores_own_publish_is_not_readable_by_its_own_subscribe(
    redis_server: RedisServer,
) -> None:
    """Core's publish derives a schema id its subscribe cannot resolve: to its DLQ."""
    async with core_consumer(redis_server.url, consumer="c-own") as heard:
        bus = create_event_bus(backend="redis", redis_url=redis_server.url)
        await bus.publish("telemetry.feedback", event(1))
        async with redis_client(redis_server.url) as r:

            async def dead_lettered() -> bool:
                return bool(await r.xlen("mdp:telemetry.feedback.dlq"))

            await until_async(dead_lettered)
            [(_, fields)] = await r.xrange("mdp:telemetry.feedback.dlq")
        await bus.close()  # type: ignore[union-attr]
        assert b"Unknown schema_id: telemetry.backpressure.FeedbackEvent" in fields[b"reason"]
        assert heard == []
    # The store's own publisher names the schema id Core's subscribe knows.
    publisher = RedisFeedbackPublisher(redis_server.url, "mdp", maxlen=100)
    assert json.loads(publisher.encode(event(1)))["meta"]["schema_id"] == "telemetry.FeedbackEvent"
    await publisher.close()


async def test_cores_ack_leaves_the_entry_pending(redis_server: RedisServer) -> None:
    """Core's ack does nothing; the documented example acknowledges with XACK itself."""
    publisher = RedisFeedbackPublisher(redis_server.url, "mdp", maxlen=100)
    bus = create_event_bus(backend="redis", redis_url=redis_server.url)
    try:
        async with (
            writing(publisher),
            redis_client(redis_server.url) as r,
            core_consumer(redis_server.url, consumer="c-ack") as heard,
        ):
            await publisher.publish(event(1))
            await until(lambda: len(heard) == 1)
            await bus.ack("telemetry.feedback", heard[0].id)
            pending = await r.xpending("mdp:telemetry.feedback", "pipeline")
            assert pending["pending"] == 1
    finally:
        await bus.close()  # type: ignore[union-attr]


@pytest.mark.logic
def test_the_publishers_are_cores_feedback_publishers() -> None:
    redis_publisher = RedisFeedbackPublisher("redis://127.0.0.1:1/0", "mdp", maxlen=100)
    assert isinstance(redis_publisher, FeedbackPublisher)


@pytest.mark.logic
def test_a_redis_url_without_the_redis_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "redis" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValidationError, match=r"market-data-store\[redis\]"):
        load_settings(feedback_redis_url="redis://127.0.0.1:6379/0")


async def test_the_documented_pipeline_subscribes_again_after_redis_restarts(
    make_settings: Callable[..., Settings], redis_server: RedisServer
) -> None:
    adjustments, stop, pipeline = await start_pipeline(redis_server.url, "p2")
    settings = redis_settings(make_settings, redis_server.url, feedback_heartbeat_s=0.2)
    async with StoreService(settings):
        await until(lambda: len(adjustments) >= 2)
        redis_server.stop()  # no persistence: the stream and its group are gone
        await asyncio.sleep(0.5)
        redis_server.start()
        heard = len(adjustments)
        await until(lambda: len(adjustments) >= heard + 3, timeout=20)
    stop.set()
    await pipeline
    assert all(a.reason is OK for a in adjustments)
