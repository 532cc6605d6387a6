"""Intake: the write subscription, from a NATS message to a queued envelope.

Every write message is decoded and validated (``decode.py``); rejected records go to
the DLQ subject of their kind with the reason in headers; the valid ones are queued
together as one envelope. A write that carries a reply subject is answered after its
records are committed, or at once with a ``400`` service error when nothing in it
could be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from store_svc.bus.client import payload_room
from store_svc.constants import (
    CONTENT_TYPE_HEADER,
    DETAIL_HEADER,
    INDEX_HEADER,
    KINDS,
    MAX_DLQ_PER_MESSAGE,
    MAX_HEADER_VALUE_CHARS,
    MAX_REPLY_ERRORS,
    OVERLOAD_RETRY_AFTER_MS,
    REASON_HEADER,
    RETRY_AFTER_HEADER,
    SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER,
    SUBJECT_HEADER,
    TRUNCATED_HEADER,
)
from store_svc.control.feedback import FeedbackLoop
from store_svc.core import BackpressureLevel
from store_svc.errors import RejectedInput
from store_svc.ingest.decode import Decoded, PayloadDecoder, Reject, header
from store_svc.ingest.queue import Envelope, QueueClosed, RecordQueue
from store_svc.settings import Settings
from store_svc.state import Stats
from store_svc.tasks import Turns

__all__ = ["CoreIntake", "header_value", "write_reply"]

log = logging.getLogger(__name__)

_encode = msgspec.json.encode


def header_value(text: str) -> str:
    """Make ``text`` safe as a NATS header value: one line, bounded length.

    Args:
        text: any text, possibly from a hostile payload.

    Returns:
        The text with control characters replaced and cut to a bounded length.
    """
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean[:MAX_HEADER_VALUE_CHARS]


def error_headers(code: int, reason: str, detail: str) -> dict[str, str]:
    """The ADR-32 error headers of a refused request: ``Nats-Service-Error:
    <reason>: <detail>`` (made header-safe) and ``Nats-Service-Error-Code``."""
    return {
        SERVICE_ERROR_HEADER: header_value(f"{reason}: {detail}"),
        SERVICE_ERROR_CODE_HEADER: str(code),
    }


def write_reply(accepted: int, rejects: list[Reject]) -> bytes:
    """The JSON body of a reply to a request-reply write.

    Args:
        accepted: records committed.
        rejects: records rejected.

    Returns:
        ``{"accepted": n, "rejected": m, "errors": [...]}`` as bytes; at most
        ``MAX_REPLY_ERRORS`` errors are listed, the counts are exact.
    """
    errors = [
        {"index": r.index, "reason": r.reason, "detail": r.detail}
        for r in rejects[:MAX_REPLY_ERRORS]
    ]
    return _encode({"accepted": accepted, "rejected": len(rejects), "errors": errors})


class CoreIntake:
    """Subscribes to the write subjects with plain (core) NATS.

    Args:
        nc: a connected NATS client.
        settings: service settings.
        decoder: the payload decoder.
        queue: where valid records go.
        stats: counters to update.
        feedback: the backpressure level (request-reply writes are refused at ``hard``).
    """

    def __init__(
        self,
        nc: NATS,
        settings: Settings,
        decoder: PayloadDecoder,
        queue: RecordQueue,
        stats: Stats,
        feedback: FeedbackLoop,
    ) -> None:
        self._nc = nc
        self._settings = settings
        self._decoder = decoder
        self._queue = queue
        self._stats = stats
        self._feedback = feedback
        self._sub: Subscription | None = None
        self._draining: asyncio.Future[None] | None = None
        self._write_prefix = settings.subject("store", "write") + "."
        self._dlq_prefix = settings.subject("store", "dlq") + "."
        self._loop = asyncio.get_running_loop()
        self._turns = Turns()
        # Records per message, smoothed: turns the client's backlog into records.
        self._records_per_msg = 1.0
        self._backlog_reported = 0
        self._backlog_step = max(1, settings.queue_capacity // 100)

    @property
    def subject(self) -> str:
        """The wildcard subject the intake listens on."""
        return self._write_prefix + ">"

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
            self._draining = asyncio.ensure_future(self._drain(sub, timeout))
        draining = self._draining
        if draining is not None:
            await asyncio.shield(draining)
            if self._draining is draining:
                self._draining = None
        if self._backlog_reported:
            self._backlog_reported = 0
            self._feedback.on_backlog(0)

    def sink_state(self, down: bool) -> None:
        """The database started (True) or stopped (False) failing commits."""

    def reconnected(self) -> None:
        """The NATS connection came back (the client re-subscribes by itself)."""

    async def close(self) -> None:
        """Release what intake still holds once the batcher has finished (nothing here)."""

    async def _drain(self, sub: Subscription, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await sub.drain()  # type: ignore[no-untyped-call]
        except TimeoutError:
            log.warning(
                "intake drain timed out after %.1fs; messages still held by the client are refused",
                timeout,
            )
            await self._unsubscribe(sub)
        except NatsError as exc:  # closed or draining connection: nothing more will arrive
            log.warning("intake drain failed (%s); unsubscribing", exc)
            await self._unsubscribe(sub)

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        # A closed connection has taken the subscription with it already.
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        await self._turns.take()
        self._report_backlog()
        self._stats.messages += 1
        if msg.reply and self._feedback.level is BackpressureLevel.hard:
            # A publisher that waits for an answer can slow down or go elsewhere:
            # refuse now rather than make it wait behind a full queue.
            self._stats.refused_overload += 1
            await self._error_reply(
                msg.reply,
                503,
                "overloaded",
                "the store's queue is at its hard watermark; retry later",
                headers={RETRY_AFTER_HEADER: str(OVERLOAD_RETRY_AFTER_MS)},
            )
            return
        received = self._loop.time()
        kind, decoded = await self._examine(msg)
        if decoded is None:
            return
        self._observe_size(len(decoded.rows))
        ack = fail = None
        if msg.reply:
            ack = self._reply_after_commit(msg, decoded)
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
                await self._error_reply(msg.reply, 503, "shutting_down", "the service is stopping")

    def _observe_size(self, records: int) -> None:
        """Fold one message's record count into the smoothed records per message
        (which turns a backlog in messages into records, and sizes JetStream pulls)."""
        self._records_per_msg += (records - self._records_per_msg) / 16

    def _report_backlog(self) -> None:
        """Tell feedback what waits in the client, when it has moved by 1 % of capacity."""
        sub = self._sub
        if sub is None:
            return
        records = int(sub.pending_msgs * self._records_per_msg)
        if abs(records - self._backlog_reported) >= self._backlog_step or (
            records == 0 and self._backlog_reported
        ):
            self._backlog_reported = records
            self._feedback.on_backlog(records)

    async def _examine(self, msg: Msg) -> tuple[str, Decoded | None]:
        """Decode and validate a write message; send its rejects to the DLQ.

        Returns:
            ``(kind, decoded)`` with at least one valid row, or ``(kind, None)`` when
            nothing in the message is usable (already refused with :meth:`_refuse`).
        """
        subject = msg.subject
        tail = subject[len(self._write_prefix) :]
        kind, _, symbol = tail.partition(".")
        try:
            decoded = self._decoder.decode(
                kind, symbol or None, msg.data, msg.headers, datetime.now(UTC)
            )
        except RejectedInput as rej:
            await self._reject_message(msg, kind, rej)
            return kind, None
        except Exception:  # a decoder bug must cost one message, not the service
            log.exception("unexpected error decoding a message on %s", subject)
            await self._reject_message(
                msg, kind, RejectedInput("internal_error", "the message could not be processed")
            )
            return kind, None
        self._stats.received[kind] += len(decoded.rows) + len(decoded.rejects)
        for n, reject in enumerate(decoded.rejects):
            if n < MAX_DLQ_PER_MESSAGE:
                await self._to_dlq(kind, subject, reject, msg.headers)
            else:  # counted, not republished one by one: one message cannot flood the DLQ
                self._stats.rejected[reject.reason] += 1
                self._stats.rejected_by_kind[kind] += 1
        if not decoded.rows:
            await self._refuse(msg, decoded.rejects)
            return kind, None
        return kind, decoded

    def _reply_after_commit(self, msg: Msg, decoded: Decoded) -> Any:
        reply = msg.reply
        body = write_reply(len(decoded.rows), decoded.rejects)

        async def send() -> None:
            await self._nc.publish(reply, body)

        return send

    def _reply_refused(self, reply: str) -> Any:
        async def send(reason: str) -> None:
            await self._error_reply(reply, 500, "sink_refused", reason)

        return send

    async def _reject_message(self, msg: Msg, kind: str, rej: RejectedInput) -> None:
        self._stats.received[kind if kind in KINDS else "unknown"] += 1
        reject = Reject(rej.reason, rej.detail, msg.data)
        await self._to_dlq(kind, msg.subject, reject, msg.headers)
        await self._refuse(msg, [reject])

    async def _refuse(self, msg: Msg, rejects: list[Reject]) -> None:
        if not msg.reply:
            return
        first = rejects[0]
        await self._error_reply(msg.reply, 400, first.reason, first.detail, write_reply(0, rejects))

    async def _error_reply(
        self,
        reply: str,
        code: int,
        reason: str,
        detail: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        out = {**error_headers(code, reason, detail), **(headers or {})}
        try:
            await self._nc.publish(reply, body, headers=out)
        except NatsError as exc:
            log.warning("could not send an error reply: %s", exc)

    async def _to_dlq(
        self,
        kind: str,
        subject: str,
        rej: Reject,
        headers: dict[str, str] | None,
        count: bool = True,
    ) -> None:
        dlq_kind = kind if kind in KINDS else "unknown"
        if count:
            self._stats.rejected[rej.reason] += 1
            self._stats.rejected_by_kind[dlq_kind] += 1
        out = {
            REASON_HEADER: rej.reason,
            DETAIL_HEADER: header_value(rej.detail),
            SUBJECT_HEADER: header_value(subject),
        }
        if rej.index is not None:
            out[INDEX_HEADER] = str(rej.index)
        ctype = header(headers, CONTENT_TYPE_HEADER) if headers else None
        if ctype:
            out["Content-Type"] = header_value(ctype)
        log.debug("rejected a %s record on %s: %s", kind, subject, rej.reason)
        body = rej.raw
        if len(body) > payload_room(self._nc, out):
            # A message of nearly the server's maximum payload does not fit beside the
            # reject headers: its first bytes go, with the original size.
            out[TRUNCATED_HEADER] = str(len(body))
            body = body[: max(0, payload_room(self._nc, out))]
        try:
            await self._nc.publish(self._dlq_prefix + dlq_kind, body, headers=out)
        except NatsError as exc:  # e.g. the reconnect buffer is full: count, go on
            self._stats.dlq_failed += 1
            log.warning("could not publish a rejected record to the DLQ: %s", exc)
