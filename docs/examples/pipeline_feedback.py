"""A pipeline listening for the store's feedback on Core's Redis event bus.

The store publishes every feedback event to Redis as well when
``STORE_FEEDBACK_REDIS_URL`` is set. This consumer uses Core's own bus
(``create_event_bus(backend="redis")``): it subscribes to ``telemetry.feedback`` with
the consumer group ``pipeline`` and turns each event into a Core ``RateAdjustment``:
``ok`` → full rate (1.0), ``soft`` → half rate (0.5), ``hard`` → pause (0.0).

Core's ``ack`` does nothing (it does not know the group), so without help every
event would stay pending in the group for ever; this consumer acknowledges with
``XACK`` itself; and its subscription ends on the first Redis error, so this one
subscribes again. Several pipeline instances may share the group (each event then
reaches one of them) or use groups of their own (each hears every event).

Run it next to a store: ``python docs/examples/pipeline_feedback.py redis://127.0.0.1:6379/0``
(needs ``pip install 'market-data-store[redis]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

import redis.asyncio
from market_data_core.events import RedisStreamsBus, create_event_bus
from market_data_core.telemetry import BackpressureLevel, FeedbackEvent, RateAdjustment

SCALE = {BackpressureLevel.ok: 1.0, BackpressureLevel.soft: 0.5, BackpressureLevel.hard: 0.0}
STREAM = "telemetry.feedback"
log = logging.getLogger("pipeline_feedback")


def to_rate_adjustment(event: FeedbackEvent, provider: str) -> RateAdjustment:
    """The rate a provider should run at, given the store's feedback.

    Args:
        event: the store's feedback event.
        provider: the provider to adjust.

    Returns:
        A Core ``RateAdjustment``.
    """
    return RateAdjustment(
        provider=provider, scale=SCALE[event.level], reason=event.level, ts=time.time()
    )


async def follow(
    url: str,
    on_adjustment: Callable[[RateAdjustment], None],
    provider: str = "synthetic",
    group: str = "pipeline",
    consumer: str | None = None,
    namespace: str = "mdp",
    stop: asyncio.Event | None = None,
) -> None:
    """Apply every feedback event until ``stop`` is set.

    Args:
        url: Redis URL.
        on_adjustment: called with each adjustment (a rate controller would apply it).
        provider: provider name to put in the adjustments.
        group: the consumer group.
        consumer: this instance's name in the group (host and pid by default).
        namespace: the key prefix the store and Core's bus share (``mdp``).
        stop: when set, the consumer returns.
    """
    acker = redis.asyncio.Redis.from_url(url)
    key = f"{namespace}:{STREAM}"
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"

    async def listen() -> None:
        # Core's subscribe ends on the first Redis error and remembers a group it made
        # once, so after an outage a fresh bus subscribes again (and re-makes the group
        # if Redis lost it).
        while True:
            bus = create_event_bus(backend="redis", redis_url=url, namespace=namespace)
            assert isinstance(bus, RedisStreamsBus)
            try:
                async for envelope in bus.subscribe(STREAM, group=group, consumer=name):
                    event = envelope.payload
                    if isinstance(event, FeedbackEvent):
                        on_adjustment(to_rate_adjustment(event, provider))
                    await bus.ack(STREAM, envelope.id)  # Core's: a no-op today
                    await acker.xack(key, group, envelope.id)  # what it should have done
            except (OSError, redis.RedisError) as exc:
                log.warning("feedback subscription lost (%s); subscribing again in 1 s", exc)
                await asyncio.sleep(1.0)
            finally:
                await bus.close()

    task = asyncio.create_task(listen())
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await acker.aclose()


if __name__ == "__main__":
    asyncio.run(follow(sys.argv[1], lambda adj: print(adj.model_dump_json())))
