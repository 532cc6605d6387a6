"""``store-svc demo``: the whole path on one machine, for a first look.

Starts a private nats-server on a random port, the service on the configured SQLite
file, and a synthetic feed of Core trades, quotes and bars (plus a few bad records,
to show the DLQ). Prints a live progress line and, at the end, what each table holds.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import msgspec
import nats
from nats.aio.msg import Msg

from store_svc.core import FeedbackEvent, HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.read.cli import print_table
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

__all__ = ["run_demo", "synthetic_records"]

SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "SPY")


def synthetic_records(kind: str, n: int, rng: random.Random, start_ns: int) -> list[dict[str, Any]]:
    """Build ``n`` plausible Core records of ``kind`` as JSON-ready dicts.

    Args:
        kind: ``trades``, ``quotes`` or ``bars``.
        n: how many.
        rng: the random source.
        start_ns: epoch nanoseconds of the first record; each next one is 1 µs later.

    Returns:
        The records, with Decimal values as strings and times as RFC 3339 text.
    """
    out: list[dict[str, Any]] = []
    for i in range(n):
        sym = rng.choice(SYMBOLS)
        px = Decimal(rng.randint(10_000, 50_000)) / 100
        ts = datetime.fromtimestamp((start_ns // 1000 + i) / 1e6, UTC).isoformat()
        if kind == "trades":
            out.append(
                {
                    "symbol": sym,
                    "ts": ts,
                    "price": str(px),
                    "size": rng.randint(1, 500),
                    "exchange": rng.choice(("XNAS", "XNYS", "ARCX")),
                    "conditions": ["@"],
                }
            )
        elif kind == "quotes":
            out.append(
                {
                    "symbol": sym,
                    "timestamp": ts,
                    "bid": str(px),
                    "ask": str(px + 1),
                    "bid_size": rng.randint(1, 9) * 100,
                    "ask_size": rng.randint(1, 9) * 100,
                }
            )
        else:
            out.append(
                {
                    "symbol": sym,
                    "ts": ts,
                    "resolution": "1s",
                    "open": str(px),
                    "high": str(px + 2),
                    "low": str(px - 2),
                    "close": str(px + 1),
                    "volume": str(rng.randint(100, 10_000)),
                }
            )
    return out


async def _feed(url: str, prefix: str, seconds: float, rate: int) -> tuple[int, int]:
    nc = await nats.connect(url)
    rng = random.Random(7)
    per_msg = 50
    sent = bad = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    kinds = ("trades", "quotes", "bars")
    try:
        while (elapsed := loop.time() - t0) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                kind = kinds[(sent // per_msg) % 3]
                recs = synthetic_records(kind, per_msg, rng, time.time_ns())
                if rng.random() < 0.02:  # now and then a bad record among good ones
                    recs[0] = {**recs[0], "symbol": 42}
                    bad += 1
                await nc.publish(f"{prefix}.store.write.{kind}", msgspec.json.encode(recs))
                sent += per_msg
            await asyncio.sleep(0.01)
        reply = await nc.request(
            f"{prefix}.store.write.trades",
            msgspec.json.encode(synthetic_records("trades", 10, rng, time.time_ns())),
            timeout=10,
        )
        print(f"\nrequest-reply write answered after commit: {reply.data.decode()}")
    finally:
        await nc.drain()
    return sent, bad


#: The settings that authenticate to a NATS server or set up TLS with it.
_NATS_AUTH = (
    "nats_creds",
    "nats_nkey",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
)


async def run_demo(settings: Settings, seconds: float = 10.0, rate: int = 20_000) -> int:
    """Run the demo and print what was stored.

    Args:
        settings: service settings (its NATS URL is replaced by the private server's,
            and NATS credentials and TLS files are left out).
        seconds: how long the feed publishes.
        rate: records per second to publish.

    Returns:
        0 on success.
    """
    with NatsServer() as server:
        # The private server is open: NATS credentials and TLS settings meant for a
        # real server are not sent to it.
        unset = dict.fromkeys(_NATS_AUTH)
        settings = settings.model_copy(update={"nats_url": server.url, **unset})
        print(f"nats-server on {server.url}; storing into {settings.database_url}")
        watcher = await nats.connect(server.url)
        feedback: list[FeedbackEvent] = []

        async def on_feedback(msg: Msg) -> None:
            feedback.append(FeedbackEvent.model_validate_json(msg.data))

        await watcher.subscribe(settings.subject("telemetry", "feedback"), cb=on_feedback)
        async with StoreService(settings) as svc:
            feed = asyncio.create_task(_feed(server.url, settings.subject_prefix, seconds, rate))
            last, t_last = 0, time.monotonic()
            while not feed.done():
                await asyncio.wait({feed}, timeout=0.5)
                now = time.monotonic()
                done = svc.stats.committed_total
                sys.stdout.write(
                    f"\rcommitted {done:>9,} rows  {(done - last) / (now - t_last):>9,.0f} rows/s"
                    f"  queue {svc.queue.depth:>7,}  rejected {svc.stats.rejected_total:>5,}"
                    f"  feedback {feedback[-1].level.value if feedback else '-':<4}"
                )
                sys.stdout.flush()
                last, t_last = done, now
            sent, bad = feed.result()
            reply = await watcher.request(settings.subject("store", "health"), b"", timeout=5)
            health = HealthStatus.model_validate_json(reply.data)
            latest = await watcher.request(
                settings.subject("store", "latest", "quotes"),
                msgspec.json.encode({"symbol": list(SYMBOLS[:4])}),
                timeout=10,
            )
        await watcher.flush()
        await watcher.drain()
        counts = await _count(settings)
    print(f"\npublished {sent:,} records ({bad} deliberately bad, sent to the DLQ)")
    if feedback:
        print(
            f"feedback on {settings.subject('telemetry', 'feedback')}: {len(feedback)} events, "
            f"levels seen {sorted({e.level.value for e in feedback})}, "
            f"last: {feedback[-1].model_dump_json()}"
        )
    print("stored per table: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    print(f"\nread back on {settings.subject('store', 'latest', 'quotes')} (the read API):")
    print_table(msgspec.json.decode(latest.data).get("records", []), sys.stdout)
    print(
        f"health on {settings.subject('store', 'health')}: {health.state} ("
        + ", ".join(f"{c.name} {c.state}" for c in health.components)
        + ")"
    )
    return 0


@runtime_checkable
class Inspectable(Protocol):
    """A sink that can count what it holds (SQLite, PostgreSQL and the in-memory one):
    for the demo, tests and benchmarks; the service never asks."""

    async def counts(self) -> dict[str, int]:
        """Rows stored per table."""
        ...


async def _count(settings: Settings) -> dict[str, int]:
    from store_svc.store.factory import make_sink

    async with make_sink(settings) as sink:
        if not isinstance(sink, Inspectable):
            raise TypeError(f"the {sink.name} sink cannot count its rows")
        return await sink.counts()
