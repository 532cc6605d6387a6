"""Core-mode intake: the write subscription, from NATS messages to queued envelopes.

The subscription is in the queue group ``STORE_QUEUE_GROUP``, so instances share the
writes. It is a *batched* subscription (``bus/receive.py``): the client's parser
puts the messages of each socket read in a :class:`~store_svc.bus.receive.Receiver`,
and one task here takes them many at a time. Every message goes through the
:class:`~store_svc.ingest.edge.WriteEdge` (decode, validate, rejects to the DLQ);
the valid records of consecutive messages of one kind are queued together as one
envelope, which still answers each message on its own: a write that carries a reply
subject is answered after its records are committed, at once with a ``400`` service
error when nothing in it could be used, or with ``503`` at the hard watermark; and
when the database refuses an envelope, the batcher splits it to find the message at
fault.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from nats.aio.subscription import Subscription

from store_svc.bus.client import OrderedFlushClient
from store_svc.bus.receive import Incoming, Receiver
from store_svc.constants import OVERLOAD_RETRY_AFTER_MS, RETRY_AFTER_HEADER
from store_svc.core import BackpressureLevel
from store_svc.ingest.decode import Reject
from store_svc.ingest.edge import (
    IntakeParts,
    MessageSize,
    RecordGroup,
    WriteEdge,
    drain_subscription,
    group_limit,
    write_reply,
)
from store_svc.ingest.queue import Envelope, QueueClosed
from store_svc.kinds import kind_or_unknown
from store_svc.tasks import Turns, cancel_and_wait

__all__ = ["CoreIntake"]

log = logging.getLogger(__name__)

#: What the publisher of a write whose rows the database refused for good is told
#: (the database's own text stays in the service log).
SINK_REFUSED_DETAIL = "the database refused these records; they were not stored"


#: Messages taken off the receiver at a time: enough to share the per-take costs,
#: few enough that a take is a short step of the loop.
TAKE_MOST = 256


class _Group(RecordGroup):
    """A group of core writes: ``answers`` holds ``(message index, reply subject,
    reply body)`` of the messages that wait for an answer."""

    __slots__ = ("answers", "settled")

    def __init__(self, kind: str, received: float) -> None:
        super().__init__(kind, received)
        #: Queued, or counted as dropped: nothing is left to count.
        self.settled = False
        self.answers: list[tuple[int, str, bytes]] = []


class _QueueClosedDuringTake(Exception):
    """The queue closed while a take was handled: messages from ``tail`` on were not
    looked at, and ``grouped`` more were in the group that could not be queued."""

    def __init__(self, tail: int, grouped: int) -> None:
        super().__init__(tail, grouped)
        self.tail = tail
        self.grouped = grouped


class CoreIntake:
    """Subscribes to the write subjects with plain (core) NATS.

    Args:
        parts: client, settings, decoder, queue, counters and backpressure.
    """

    def __init__(self, parts: IntakeParts) -> None:
        if not isinstance(parts.nc, OrderedFlushClient):
            raise TypeError("core intake needs the service's client (bus.client)")
        self._nc: OrderedFlushClient = parts.nc
        self._settings = parts.settings
        self._queue = parts.queue
        self._stats = parts.stats
        self._pressure = parts.pressure
        self._edge = WriteEdge(parts, self._refuse)
        self._sub: Subscription | None = None
        self._receiver: Receiver | None = None
        self._consumer: asyncio.Task[None] | None = None
        #: Whether the consumer is handling a take; ``_progress`` is set after each.
        self._busy = False
        self._progress = asyncio.Event()
        self._draining: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._turns = Turns()
        self._size = MessageSize(1.0)
        self._backlog_reported = 0
        self._backlog_step = max(1, parts.settings.queue_capacity // 100)
        self._group_most = group_limit(parts.settings)

    @property
    def subject(self) -> str:
        """The wildcard subject the intake listens on."""
        return self._edge.subject

    @property
    def subscription(self) -> Subscription | None:
        """The live subscription, if started."""
        return self._sub

    @property
    def pending_msgs(self) -> int:
        """Messages received and not yet taken (what waits in the client)."""
        receiver = self._receiver
        return receiver.pending_msgs if receiver is not None else 0

    async def start(self, timeout: float = 5.0) -> None:
        """Subscribe in the queue group (again, after a pause: the messages still held
        from before it are handled first, in order). Nothing here waits for the server
        (``timeout`` is for JetStream's set-up)."""
        settings = self._settings
        self._sub, receiver = await self._nc.subscribe_batched(
            self.subject,
            settings.queue_group,
            settings.write_pending_msgs,
            settings.write_pending_bytes,
            receiver=self._receiver,
        )
        if self._consumer is None or self._consumer.done():
            self._receiver = receiver
            self._consumer = asyncio.create_task(self._consume(receiver), name="core-intake")
        # A round trip makes the server know the subscription before start() returns,
        # so a write sent right after start-up finds a responder.
        await self._nc.flush()
        log.info("listening on %s (queue group %s)", self.subject, settings.queue_group)

    async def stop(self, timeout: float) -> None:
        """Stop intake: no new messages; those already delivered are still handled.

        Waits at most ``timeout`` seconds for them; what is still held then goes on
        being handled (a pause: until the queue has room), and :meth:`close` ends it.
        A second call while a drain is under way (a shutdown during a pause) waits
        for that drain instead of returning early.

        Args:
            timeout: seconds to wait for the delivered messages to be handled.
        """
        deadline = self._loop.time() + timeout
        sub, self._sub = self._sub, None
        if sub is not None:
            self._draining = asyncio.ensure_future(self._drain(sub, timeout))
        draining = self._draining
        if draining is not None:
            await asyncio.shield(draining)
            if self._draining is draining:
                self._draining = None
        # Also after a pause whose wait ran out (a shutdown while paused): what is
        # still held gets the rest of the time to be queued.
        await self._settle(max(0.0, deadline - self._loop.time()))
        receiver = self._receiver
        if receiver is not None:
            self._report_backlog(receiver)
        elif self._backlog_reported:
            self._backlog_reported = 0
            self._pressure.on_backlog(0)

    async def _drain(self, sub: Subscription, timeout: float) -> None:
        # UNSUB, then a round trip: every message sent before it is in the receiver.
        await drain_subscription(sub, timeout)
        self._nc.unbatch(sub)

    async def _settle(self, timeout: float) -> None:
        """Wait until intake holds nothing it has not queued, at most ``timeout`` s."""
        receiver = self._receiver
        try:
            async with asyncio.timeout(timeout):
                while receiver is not None and (receiver.pending_msgs or self._busy):
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            log.info(
                "intake stopped taking messages; %d received ones are still waiting for "
                "room in the queue",
                self.pending_msgs,
            )

    def sink_state(self, down: bool) -> None:
        """The database started (True) or stopped (False) failing commits (nothing to do:
        the queue fills and the intake waits)."""

    def reconnected(self) -> None:
        """The NATS connection came back (the client re-subscribes by itself)."""

    async def close(self) -> None:
        """End intake for good (after the batcher): what it still holds, which the
        queue can no longer take, is dropped and counted."""
        consumer, self._consumer = self._consumer, None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.close()
        await cancel_and_wait(consumer)  # counts what its take had not queued
        if receiver is not None and receiver.pending_msgs:
            left = receiver.take(receiver.pending_msgs)
            self._count_dropped(left)
            log.warning(
                "intake closed with %d received messages not yet taken: dropped and counted",
                len(left),
            )

    async def _consume(self, receiver: Receiver) -> None:
        """Take the receiver's messages, many at a time, until it is closed and empty."""
        while True:
            await receiver.wait()
            items = receiver.take(TAKE_MOST)
            if not items:
                return  # closed, and everything handled
            self._busy = True
            try:
                await self._handle(items)
            except _QueueClosedDuringTake as closed:
                # Shutdown closed the queue (its grace period ran out): nothing more
                # can be queued, so the rest is answered and counted at once.
                await self._cut_off(receiver, items, closed)
                return
            except Exception:  # a bug must cost these messages, not the intake
                log.exception("unexpected error handling %d write messages", len(items))
            finally:
                self._busy = False
                self._progress.set()
            self._report_backlog(receiver)
            await self._turns.take()

    async def _handle(self, items: list[Incoming]) -> None:
        """Decode, group and queue one take of messages, in order.

        ``tail`` is the first message whose fate is not settled outside the open
        group: if the task is cancelled (intake closed while waiting for room), the
        open group's messages and those from ``tail`` on are counted as dropped.
        """
        stats, edge, pressure, turns = self._stats, self._edge, self._pressure, self._turns
        stats.messages += len(items)
        if self._queue.closed:
            raise _QueueClosedDuringTake(0, 0)
        received = self._loop.time()
        now = datetime.now(UTC)
        group: _Group | None = None
        most = self._group_most
        observe = self._size.observe
        tail = 0
        try:
            for index, msg in enumerate(items):
                tail = index
                if turns.due():
                    # A take of large messages is seconds of work: the loop gets its
                    # turns within it (health, feedback, the other connection).
                    await turns.take()
                if msg.reply and pressure.level is BackpressureLevel.hard:
                    # A publisher that waits for an answer can slow down or go
                    # elsewhere: refuse now rather than make it wait behind a full queue.
                    stats.refused_overload += 1
                    tail = index + 1
                    await self._edge.error_reply(
                        msg.reply,
                        503,
                        "overloaded",
                        "the store's queue is at its hard watermark; retry later",
                        headers={RETRY_AFTER_HEADER: str(OVERLOAD_RETRY_AFTER_MS)},
                    )
                    continue
                found = edge.clean(msg, now)
                if found is None:
                    kind, decoded = await edge.examine(msg)
                    if decoded is None:
                        continue
                else:
                    kind, decoded = found
                rows = decoded.rows
                observe(len(rows))
                if group is not None and not group.fits(kind, len(rows), most):
                    await self._put(group)
                    group = None
                    # Queuing may have moved the level: the next requests see it.
                if group is None:
                    group = _Group(kind, received)
                stats.accepted[kind] += len(rows)
                at = group.add(rows)
                if msg.reply:
                    group.answers.append((at, msg.reply, write_reply(len(rows), decoded.rejects)))
                tail = index + 1
            tail = len(items)
            if group is not None:
                await self._put(group)
        except QueueClosed:
            grouped = 0
            if group is not None and not group.settled:
                stats.accepted[group.kind] -= len(group.rows)
                self._count_group_dropped(group)
                grouped = len(group.ends)
                await self._shutting_down([reply for _, reply, _ in group.answers])
            raise _QueueClosedDuringTake(tail, grouped) from None
        except asyncio.CancelledError:
            if group is not None and not group.settled:
                stats.accepted[group.kind] -= len(group.rows)
                self._count_group_dropped(group)
            self._count_dropped(items[tail:])
            raise

    def _count_group_dropped(self, group: _Group) -> None:
        group.settled = True
        self._stats.dropped_messages += len(group.ends)
        self._stats.dropped_by_kind[group.kind] += len(group.ends)

    def _count_dropped(self, msgs: list[Incoming]) -> None:
        stats = self._stats
        stats.dropped_messages += len(msgs)
        prefix = len(self._edge.write_prefix)
        for msg in msgs:
            stats.dropped_by_kind[kind_or_unknown(msg.subject[prefix:].partition(".")[0])] += 1

    async def _put(self, group: _Group) -> None:
        """Queue ``group``'s envelope (QueueClosed: the queue has closed)."""
        await self._queue.put(self._envelope(group))
        group.settled = True

    async def _cut_off(
        self, receiver: Receiver, items: list[Incoming], closed: _QueueClosedDuringTake
    ) -> None:
        """The queue closed during a take: count the rest of the take and everything
        the receiver holds as dropped, answer their requests, log it once."""
        receiver.close()
        left = items[closed.tail :] + receiver.take(receiver.pending_msgs)
        self._count_dropped(left)
        await self._shutting_down([m.reply for m in left if m.reply])
        log.error(
            "intake closed during shutdown: %d received messages were not stored (counted "
            "as dropped; requests answered 503 shutting_down)",
            closed.grouped + len(left),
        )

    async def _shutting_down(self, replies: list[str]) -> None:
        for reply in replies:
            await self._edge.error_reply(reply, 503, "shutting_down", "the service is stopping")

    def _envelope(self, group: _Group) -> Envelope:
        """The envelope of ``group``: its rows, the answers after the commit, and how
        to split it into one envelope per message."""
        answers = group.answers
        ack = self._replies(answers) if answers else None
        fail = self._refusals([reply for _, reply, _ in answers]) if answers else None
        split = self._splitter(group) if len(group.ends) > 1 else None
        return Envelope(group.kind, group.rows, group.received, ack, fail, split=split)

    def _splitter(self, group: _Group) -> Callable[[], list[Envelope]]:
        def split() -> list[Envelope]:
            by_index = {i: (reply, body) for i, reply, body in group.answers}
            out = []
            for i, rows in enumerate(group.slices()):
                answer = by_index.get(i)
                ack = fail = None
                if answer is not None:
                    ack = self._replies([(i, *answer)])
                    fail = self._refusals([answer[0]])
                out.append(Envelope(group.kind, rows, group.received, ack, fail))
            return out

        return split

    def _report_backlog(self, receiver: Receiver) -> None:
        """Tell feedback what waits in the client, when it has moved by 1 % of capacity."""
        records = int(receiver.pending_msgs * self._size.value)
        if abs(records - self._backlog_reported) >= self._backlog_step or (
            records == 0 and self._backlog_reported
        ):
            self._backlog_reported = records
            self._pressure.on_backlog(records)

    def _replies(self, answers: list[tuple[int, str, bytes]]) -> Callable[[], Awaitable[None]]:
        nc = self._nc

        async def send() -> None:
            await nc.publish_many([(reply, body) for _, reply, body in answers])

        return send

    def _refusals(self, replies: list[str]) -> Callable[[str], Awaitable[None]]:
        async def send(reason: str) -> None:
            for reply in replies:
                await self._edge.error_reply(reply, 500, "sink_refused", SINK_REFUSED_DETAIL)

        return send

    async def _refuse(self, msg: Incoming, rejects: list[Reject]) -> None:
        if not msg.reply:
            return
        first = rejects[0]
        await self._edge.error_reply(
            msg.reply, 400, first.reason, first.detail, write_reply(0, rejects)
        )
