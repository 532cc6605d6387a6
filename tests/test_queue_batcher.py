"""Pure logic of the bounded queue and the batcher (in-memory sink; no NATS needed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from store_svc.bus.client import OrderedFlushClient
from store_svc.bus.receive import Incoming
from store_svc.core import BackpressureLevel
from store_svc.ingest.batcher import Batcher
from store_svc.ingest.decode import PayloadDecoder
from store_svc.ingest.edge import IntakeParts
from store_svc.ingest.intake import CoreIntake
from store_svc.ingest.queue import Envelope, QueueClosed, RecordQueue
from store_svc.settings import Settings
from store_svc.state import Stats
from store_svc.store.memory import MemorySink

from .conftest import until

pytestmark = pytest.mark.logic


def env(n: int, kind: str = "trades", start: int = 0) -> Envelope:
    rows = [(f"S{start + i}", None, None, None, None, ()) for i in range(n)]
    return Envelope(kind, rows, asyncio.get_running_loop().time())


async def test_queue_counts_records_not_messages() -> None:
    q = RecordQueue(capacity=10)
    assert q.put_nowait(env(4))
    assert q.put_nowait(env(6))
    assert q.depth == 10
    assert not q.put_nowait(env(1))
    assert q.get_nowait() is not None
    assert q.depth == 6


async def test_put_waits_until_there_is_room_and_keeps_order() -> None:
    q = RecordQueue(capacity=5)
    await q.put(env(5, start=0))
    waiting = [asyncio.create_task(q.put(env(3, start=10 + i))) for i in range(2)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in waiting)
    first = await q.get()
    assert first is not None
    await until(lambda: waiting[0].done())
    assert not waiting[1].done(), "3 + 3 records do not fit in 5"
    assert (await q.get()).rows[0][0] == "S10"  # type: ignore[union-attr]
    await until(lambda: waiting[1].done())
    assert (await q.get()).rows[0][0] == "S11"  # type: ignore[union-attr]


async def test_an_envelope_bigger_than_the_queue_still_passes_alone() -> None:
    q = RecordQueue(capacity=5)
    await asyncio.wait_for(q.put(env(50)), 1)
    assert q.depth == 50
    assert not q.put_nowait(env(1))


async def test_close_wakes_waiters_and_keeps_queued_items() -> None:
    q = RecordQueue(capacity=1)
    await q.put(env(1))
    blocked = asyncio.create_task(q.put(env(1)))
    await asyncio.sleep(0)
    q.close()
    with pytest.raises(QueueClosed):
        await blocked
    assert await q.get() is not None
    assert await q.get() is None
    with pytest.raises(QueueClosed):
        q.put_nowait(env(1))


async def test_get_times_out() -> None:
    assert await RecordQueue(capacity=1).get(timeout=0.01) is None


async def test_depth_callback_sees_every_change() -> None:
    seen: list[int] = []
    q = RecordQueue(capacity=100, on_depth=seen.append)
    await q.put(env(3))
    await q.put(env(4))
    await q.get()
    assert seen == [3, 7, 4]


def acking(i: int, acked: list[int]) -> Envelope:
    """A one-record envelope whose ack appends ``i`` to ``acked``."""
    e = env(1, start=i)

    async def ack() -> None:
        acked.append(i)

    e.ack = ack
    return e


def _batcher(q: RecordQueue, sink: MemorySink, **kw: float) -> Batcher:
    return Batcher(
        q,
        sink,
        Stats(),
        batch_size=int(kw.get("batch_size", 10)),
        flush_interval=kw.get("flush_interval", 0.05),
        retry_initial=0.01,
        retry_max=0.02,
    )


async def test_batches_close_at_the_batch_size() -> None:
    q = RecordQueue(capacity=1000)
    sink = MemorySink()
    sink.gate.clear()  # hold the first commit so the queue fills behind it
    b = _batcher(q, sink, batch_size=10, flush_interval=10.0)
    for i in range(30):
        await q.put(env(1, start=i))
    task = asyncio.create_task(b.run())
    await until(lambda: q.depth == 20)
    sink.gate.set()
    await until(lambda: sum(sink.batches) == 30)
    q.close()
    await task
    assert sink.batches == [10, 10, 10]


async def test_a_partial_batch_goes_out_after_the_linger() -> None:
    q = RecordQueue(capacity=1000)
    sink = MemorySink()
    b = _batcher(q, sink, batch_size=1000, flush_interval=0.02)
    task = asyncio.create_task(b.run())
    await q.put(env(3))
    await until(lambda: sink.batches == [3])
    q.close()
    await task


async def test_failed_commits_are_retried_and_nothing_is_dropped() -> None:
    q = RecordQueue(capacity=1000)
    sink = MemorySink()
    sink.fail = True
    b = _batcher(q, sink, batch_size=5)
    acked: list[int] = []

    def acker(i: int) -> Envelope:
        return acking(i, acked)

    task = asyncio.create_task(b.run())
    for i in range(5):
        await q.put(acker(i))
    await until(lambda: b._stats.sink_errors >= 3)
    assert acked == []
    assert not b.sink_ok
    sink.fail = False
    await until(lambda: acked == [0, 1, 2, 3, 4])
    assert b.sink_ok
    assert b._stats.committed["trades"] == 5
    q.close()
    await task


async def test_close_flushes_everything_left() -> None:
    q = RecordQueue(capacity=1000)
    sink = MemorySink()
    b = _batcher(q, sink, batch_size=7, flush_interval=10.0)
    for i in range(20):
        await q.put(env(1, start=i))
    q.close()
    await asyncio.wait_for(b.run(), 5)
    assert sum(sink.batches) == 20
    assert (await sink.counts())["trades"] == 20


async def test_an_unexpected_sink_error_is_retried_too() -> None:
    q = RecordQueue(capacity=100)

    class Flaky(MemorySink):
        calls = 0

        async def write(self, batch):  # type: ignore[no-untyped-def]
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise TypeError("a bug in a sink")
            await super().write(batch)

    sink = Flaky()
    b = _batcher(q, sink, batch_size=5)
    task = asyncio.create_task(b.run())
    await q.put(env(3))
    await until(lambda: sink.batches == [3])
    assert b._stats.sink_errors == 1
    q.close()
    await task


async def test_a_batch_the_database_refuses_is_split_and_only_the_culprit_dropped() -> None:
    from store_svc.errors import SinkError

    class Picky(MemorySink):
        async def write(self, batch):  # type: ignore[no-untyped-def]
            if any(row[0] == "POISON" for rows in batch.values() for row in rows):
                raise SinkError("value refused", retryable=False)
            await super().write(batch)

    q = RecordQueue(capacity=100)
    sink = Picky()
    b = _batcher(q, sink, batch_size=100, flush_interval=10.0)
    acked: list[str] = []
    failed: list[str] = []

    def make(symbol: str) -> Envelope:
        e = Envelope("trades", [(symbol, None, None, None, None, ())], 0.0)

        async def ack() -> None:
            acked.append(symbol)

        async def fail(reason: str) -> None:
            failed.append(f"{symbol}: {reason}")

        e.ack, e.fail = ack, fail
        return e

    for symbol in ("A", "B", "POISON", "C"):
        await q.put(make(symbol))
    q.close()
    await asyncio.wait_for(b.run(), 5)
    assert acked == ["A", "B", "C"]
    assert failed == ["POISON: the database refused these records: value refused"]
    assert b._stats.rejected["sink_refused"] == 1
    assert (await sink.counts())["trades"] == 3


async def test_an_overlapping_sink_stages_the_next_batch_but_commits_in_order() -> None:
    from store_svc.errors import SinkError

    commits: list[str] = []

    class Flaky(MemorySink):
        failures = 3

        async def write(self, batch):  # type: ignore[no-untyped-def]
            await self.gate.wait()
            symbol = next(iter(batch["bars"]))[0]
            if symbol == "FIRST" and Flaky.failures:
                Flaky.failures -= 1
                raise SinkError("connection lost")
            commits.append(f"{symbol}={next(iter(batch['bars']))[3]}")
            await super().write(batch)

    def bar(symbol: str, close: int) -> Envelope:
        # Same key (symbol, resolution, ts) for the two SAME bars: the later must win.
        row = (symbol, "1m", 0, close, None, None, None, None, False)
        return Envelope("bars", [row], asyncio.get_running_loop().time())

    q = RecordQueue(capacity=100)
    sink = Flaky(overlap=True)
    sink.gate.clear()
    b = _batcher(q, sink, batch_size=1, flush_interval=10.0)
    task = asyncio.create_task(b.run())
    await q.put(bar("FIRST", 0))
    await q.put(bar("SAME", 1))
    await q.put(bar("SAME", 2))
    await until(lambda: sink.prepared == 1)  # the second batch is staged, held behind the first
    assert b.in_flight == 2
    assert q.depth == 1
    sink.gate.set()
    q.close()
    await asyncio.wait_for(task, 5)
    assert commits == ["FIRST=0", "SAME=1", "SAME=2"]
    assert [r[3] for r in await sink.rows("bars")] == [0, 2]
    assert b._stats.sink_errors == 3
    assert b.in_flight == 0


async def test_withdrawn_envelopes_are_left_out_and_recovery_is_still_noticed() -> None:
    q = RecordQueue(capacity=100)
    sink = MemorySink()
    sink.fail = True
    b = _batcher(q, sink, batch_size=100, flush_interval=0.01)
    states: list[bool] = []
    b.on_sink_state = states.append
    acked: list[int] = []

    def acker(i: int) -> Envelope:
        return acking(i, acked)

    envs = [acker(i) for i in range(3)]
    task = asyncio.create_task(b.run())
    for e in envs:
        await q.put(e)
    await until(lambda: b._stats.sink_errors >= 2)
    for e in envs[:2]:
        e.withdrawn = True  # handed back (JetStream nak) while the database is down
    await asyncio.sleep(0.05)
    sink.fail = False
    await until(lambda: acked == [2])
    assert (await sink.counts())["trades"] == 1, "withdrawn records are not written"
    envs[2].withdrawn = True  # already committed: nothing changes
    for e in [acker(10), acker(11)]:
        e.withdrawn = True
        await q.put(e)
    sink.fail = True
    await asyncio.sleep(0.05)
    assert b.sink_ok, "an all-withdrawn batch is no reason to call the database down"
    held = [acker(20), acker(21)]
    await q.put(held[0])
    await until(lambda: not b.sink_ok)
    q.put_nowait(held[1])
    await until(lambda: b._stats.sink_errors >= 6)
    # Everything still held (in the failing batch and queued) is handed back ...
    for e in held:
        e.withdrawn = True
    await asyncio.sleep(0.05)
    assert states == [True, False, True]
    # ... the empty write goes on as a probe, so recovery is noticed with nothing to write.
    sink.fail = False
    await until(lambda: b.sink_ok)
    assert states == [True, False, True, False]
    assert b.in_flight == 0
    q.close()
    await asyncio.wait_for(task, 5)
    assert acked == [2]


async def test_group_commit_flushes_at_once_when_idle_and_batches_while_busy() -> None:
    q = RecordQueue(capacity=1000)
    sink = MemorySink(overlap=True)
    b = _batcher(q, sink, batch_size=100, flush_interval=30.0)  # a linger never reached
    task = asyncio.create_task(b.run())
    await q.put(env(1))
    await until(lambda: sink.batches == [1], timeout=2)  # idle sink: no linger
    sink.gate.clear()  # the next commit is held: the sink is busy
    await q.put(env(1, start=1))
    await until(lambda: b.in_flight == 1)
    for i in range(5):
        await q.put(env(1, start=10 + i))
    await asyncio.sleep(0.05)
    sink.gate.set()
    await until(lambda: sum(sink.batches) == 7, timeout=2)
    assert sink.batches == [1, 1, 5], "what came during the busy commit went in one batch"
    q.close()
    await asyncio.wait_for(task, 5)


class _Level:
    """A backpressure level that stays ``ok`` (pure logic)."""

    level = BackpressureLevel.ok

    def on_backlog(self, records: int) -> None: ...


async def test_core_intake_groups_messages_and_a_refused_one_costs_only_itself() -> None:
    from store_svc.errors import SinkError

    class Picky(MemorySink):
        async def write(self, batch):  # type: ignore[no-untyped-def]
            if any(row[0] == "POISON" for rows in batch.values() for row in rows):
                raise SinkError("value refused", retryable=False)
            await super().write(batch)

    settings = Settings.model_construct(queue_capacity=1000, batch_size=100)
    queue = RecordQueue(capacity=1000)
    stats = Stats()
    intake = CoreIntake(
        IntakeParts(
            OrderedFlushClient(), settings, PayloadDecoder(1 << 20, 5.0), queue, stats, _Level()
        )
    )
    answered: list[tuple[str, bytes]] = []
    refused: list[str] = []

    async def publish_many(messages: list[tuple[str, bytes]]) -> None:
        answered.extend(messages)

    async def error_reply(reply: str, code: int, reason: str, *args: Any, **kw: Any) -> None:
        refused.append(f"{reply} {code} {reason}")

    intake._nc.publish_many = publish_many  # type: ignore[method-assign]
    intake._edge.error_reply = error_reply  # type: ignore[method-assign]
    symbols = ["A", "B", "POISON", "C", "D"]
    items = [
        Incoming(
            f"mdp.store.write.trades.{s}",
            f"r.{s}" if i % 2 == 0 else "",
            json.dumps({"symbol": s, "ts": 1714570200 + i, "price": "1.5", "size": 1}).encode(),
            None,
        )
        for i, s in enumerate(symbols)
    ]
    await intake._handle(items)
    envelopes = [queue.get_nowait() for _ in range(len(queue))]
    assert [len(e.rows) for e in envelopes] == [5], "consecutive messages of a kind: one envelope"
    for e in envelopes:
        queue.put_nowait(e)
    queue.close()
    sink = Picky()
    b = Batcher(queue, sink, stats, batch_size=100, flush_interval=10.0)
    await asyncio.wait_for(b.run(), 5)
    assert sorted(r[0] for r in await sink.rows("trades")) == ["A", "B", "C", "D"]
    # Each message is answered on its own: A and D accepted, POISON refused (B and C
    # were plain publishes).
    assert sorted(subject for subject, _ in answered) == ["r.A", "r.D"]
    assert all(json.loads(body)["accepted"] == 1 for _, body in answered)
    assert refused == ["r.POISON 500 sink_refused"]
    assert stats.rejected["sink_refused"] == 1
    assert stats.committed["trades"] == 4


async def test_a_take_of_large_messages_gives_the_loop_its_turns() -> None:
    """Decoding 40 messages of 1000 trades is tens of milliseconds: other tasks (health,
    feedback) must run within it, not after it."""
    settings = Settings.model_construct(queue_capacity=100_000, batch_size=1000)
    queue = RecordQueue(capacity=100_000)
    intake = CoreIntake(
        IntakeParts(
            OrderedFlushClient(), settings, PayloadDecoder(1 << 24, 5.0), queue, Stats(), _Level()
        )
    )
    body = json.dumps(
        [{"symbol": "A", "ts": 1714570200 + i, "price": "1.5", "size": i + 1} for i in range(1000)]
    ).encode()
    items = [Incoming("mdp.store.write.trades", "", body, None) for _ in range(40)]
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await intake._handle(items)
    done = True
    await task
    assert queue.depth == 40_000
    assert ticks - before >= 5, "the take held the loop from start to end"
