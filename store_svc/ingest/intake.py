"""Core-mode intake: the write subscription, from a NATS message to a queued envelope.

The subscription is in the queue group ``STORE_QUEUE_GROUP``, so instances share the
writes. Every message goes through the :class:`~store_svc.ingest.edge.WriteEdge`
(decode, validate, rejects to the DLQ); the valid records are queued together as one
envelope. A write that carries a reply subject is answered after its records are
committed, at once with a ``400`` service error when nothing in it could be used, or
with ``503`` at the hard watermark.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from store_svc.constants import OVERLOAD_RETRY_AFTER_MS, RETRY_AFTER_HEADER
from store_svc.core import BackpressureLevel
from store_svc.ingest.decode import Decoded, Reject
from store_svc.ingest.edge import (
    IntakeParts,
    MessageSize,
    WriteEdge,
    drain_subscription,
    write_reply,
)
from store_svc.ingest.queue import Envelope, QueueClosed
from store_svc.tasks import Turns

__all__ = ["CoreIntake"]

log = logging.getLogger(__name__)

#: What the publisher of a write whose rows the database refused for good is told
#: (the database's own text stays in the service log).
SINK_REFUSED_DETAIL = "the database refused these records; they were not stored"


class CoreIntake:
    """Subscribes to the write subjects with plain (core) NATS.

    Args:
        parts: client, settings, decoder, queue, counters and backpressure.
    """

    def __init__(self, parts: IntakeParts) -> None:
        self._nc = parts.nc
        self._settings = parts.settings
        self._queue = parts.queue
        self._stats = parts.stats
        self._pressure = parts.pressure
        self._edge = WriteEdge(parts, self._refuse)
        self._sub: Subscription | None = None
        self._draining: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._turns = Turns()
        self._size = MessageSize(1.0)
        self._backlog_reported = 0
        self._backlog_step = max(1, parts.settings.queue_capacity // 100)

    @property
    def subject(self) -> str:
        """The wildcard subject the intake listens on."""
        return self._edge.subject

    @property
    def subscription(self) -> Subscription | None:
        """The live subscription, if started."""
        return self._sub

    async def start(self) -> None:
        """Subscribe in the queue group."""
        self._sub = await self._nc.subscribe(
            self.subject,
            queue=self._settings.queue_group,
            cb=self._on_msg,
            pending_msgs_limit=self._settings.write_pending_msgs,
            pending_bytes_limit=self._settings.write_pending_bytes,
        )
        # A round trip makes the server know the subscription before start() returns,
        # so a write sent right after start-up finds a responder.
        await self._nc.flush()
        log.info("listening on %s (queue group %s)", self.subject, self._settings.queue_group)

    async def stop(self, timeout: float) -> None:
        """Stop intake: no new messages; those already delivered are still handled.

        A second call while a drain is under way (a shutdown during a pause) waits
        for that drain instead of returning early.

        Args:
            timeout: seconds to wait for the delivered messages to be handled.
        """
        sub, self._sub = self._sub, None
        if sub is not None:
            self._draining = asyncio.ensure_future(drain_subscription(sub, timeout))
        draining = self._draining
        if draining is not None:
            await asyncio.shield(draining)
            if self._draining is draining:
                self._draining = None
        if self._backlog_reported:
            self._backlog_reported = 0
            self._pressure.on_backlog(0)

    def sink_state(self, down: bool) -> None:
        """The database started (True) or stopped (False) failing commits (nothing to do:
        the queue fills and the intake waits)."""

    def reconnected(self) -> None:
        """The NATS connection came back (the client re-subscribes by itself)."""

    async def close(self) -> None:
        """Release what intake still holds once the batcher has finished (nothing here)."""

    async def _on_msg(self, msg: Msg) -> None:
        await self._turns.take()
        self._report_backlog()
        self._stats.messages += 1
        if msg.reply and self._pressure.level is BackpressureLevel.hard:
            # A publisher that waits for an answer can slow down or go elsewhere:
            # refuse now rather than make it wait behind a full queue.
            self._stats.refused_overload += 1
            await self._edge.error_reply(
                msg.reply,
                503,
                "overloaded",
                "the store's queue is at its hard watermark; retry later",
                headers={RETRY_AFTER_HEADER: str(OVERLOAD_RETRY_AFTER_MS)},
            )
            return
        received = self._loop.time()
        kind, decoded = await self._edge.examine(msg)
        if decoded is None:
            return
        self._size.observe(len(decoded.rows))
        ack = fail = None
        if msg.reply:
            ack = self._reply_after_commit(msg.reply, decoded)
            fail = self._reply_refused(msg.reply)
        self._stats.accepted[kind] += len(decoded.rows)
        try:
            await self._queue.put(Envelope(kind, decoded.rows, received, ack, fail))
        except QueueClosed:
            # Only reachable when shutdown cut a drain short; say so, never silently.
            self._stats.accepted[kind] -= len(decoded.rows)
            log.error(
                "dropped %d %s records: intake closed during shutdown", len(decoded.rows), kind
            )
            if msg.reply:
                await self._edge.error_reply(
                    msg.reply, 503, "shutting_down", "the service is stopping"
                )

    def _report_backlog(self) -> None:
        """Tell feedback what waits in the client, when it has moved by 1 % of capacity."""
        sub = self._sub
        if sub is None:
            return
        records = int(sub.pending_msgs * self._size.value)
        if abs(records - self._backlog_reported) >= self._backlog_step or (
            records == 0 and self._backlog_reported
        ):
            self._backlog_reported = records
            self._pressure.on_backlog(records)

    def _reply_after_commit(self, reply: str, decoded: Decoded) -> Callable[[], Awaitable[None]]:
        body = write_reply(len(decoded.rows), decoded.rejects)

        async def send() -> None:
            await self._nc.publish(reply, body)

        return send

    def _reply_refused(self, reply: str) -> Callable[[str], Awaitable[None]]:
        async def send(reason: str) -> None:
            await self._edge.error_reply(reply, 500, "sink_refused", SINK_REFUSED_DETAIL)

        return send

    async def _refuse(self, msg: Msg, rejects: list[Reject]) -> None:
        if not msg.reply:
            return
        first = rejects[0]
        await self._edge.error_reply(
            msg.reply, 400, first.reason, first.detail, write_reply(0, rejects)
        )
