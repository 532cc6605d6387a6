"""A pipeline-side consumer of the store's feedback, as docs/protocol.md describes it.

Subscribes to ``<prefix>.telemetry.feedback``, decodes every event with Core's own
pydantic model, and turns it into a Core ``RateAdjustment`` for a provider:
``ok`` → full rate (1.0), ``soft`` → half rate (0.5), ``hard`` → pause (0.0).

Run it next to a store: ``python docs/examples/feedback_consumer.py nats://127.0.0.1:4222``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import nats
from market_data_core.telemetry import BackpressureLevel, FeedbackEvent, RateAdjustment
from nats.aio.msg import Msg

SCALE = {BackpressureLevel.ok: 1.0, BackpressureLevel.soft: 0.5, BackpressureLevel.hard: 0.0}


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
    subject: str = "mdp.telemetry.feedback",
    stop: asyncio.Event | None = None,
) -> None:
    """Apply every feedback event until ``stop`` is set.

    Args:
        url: NATS URL.
        on_adjustment: called with each adjustment (a rate controller would apply it).
        provider: provider name to put in the adjustments.
        subject: the feedback subject.
        stop: when set, the consumer unsubscribes and returns.
    """
    nc = await nats.connect(url)

    async def on_feedback(msg: Msg) -> None:
        event = FeedbackEvent.model_validate_json(msg.data)
        on_adjustment(to_rate_adjustment(event, provider))

    await nc.subscribe(subject, cb=on_feedback)
    await nc.flush()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(follow(sys.argv[1], lambda adj: print(adj.model_dump_json())))
