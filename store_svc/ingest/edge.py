"""What both intakes (core and JetStream) do with a write message at the edge.

:class:`WriteEdge` decodes and validates a message (``decode.py``), sends its
rejected records to the DLQ subject of their kind with the reason in headers, and
counts everything; a message with nothing usable is handed to the intake's own
``refuse`` (core: a ``400`` reply; JetStream: terminate). Each intake *has* an edge
(composition): the transports differ, the edge is the same.

:class:`IntakeParts` is what an intake is built from, and :class:`Intake` the
interface the service drives it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from store_svc.bus.client import payload_room
from store_svc.bus.headers import error_headers, header, header_value
from store_svc.constants import (
    CONTENT_TYPE_HEADER,
    DETAIL_HEADER,
    INDEX_HEADER,
    MAX_DLQ_PER_MESSAGE,
    MAX_REPLY_ERRORS,
    REASON_HEADER,
    SUBJECT_HEADER,
    TRUNCATED_HEADER,
)
from store_svc.errors import RejectedInput
from store_svc.ingest.backpressure import Pressure
from store_svc.ingest.decode import Decoded, PayloadDecoder, Reject
from store_svc.ingest.queue import RecordQueue
from store_svc.kinds import Row, kind_or_unknown
from store_svc.settings import Settings
from store_svc.state import Stats

__all__ = [
    "Intake",
    "IntakeParts",
    "RecordGroup",
    "WriteEdge",
    "drain_subscription",
    "group_limit",
    "write_reply",
]

log = logging.getLogger(__name__)

_encode = msgspec.json.encode


class WriteMessage(Protocol):
    """What the edge reads of a write message: a nats-py ``Msg`` (JetStream) or a
    :class:`~store_svc.bus.receive.Incoming` (core mode's batched subscription)."""

    @property
    def subject(self) -> str: ...
    @property
    def reply(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str] | None: ...


#: What a message with nothing usable is handed to: ``refuse(msg, rejects)``.
Refuse = Callable[[Any, list[Reject]], Awaitable[None]]


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


@dataclass(frozen=True, slots=True)
class IntakeParts:
    """What an intake is built from.

    Attributes:
        nc: the ingest connection's client.
        settings: service settings.
        decoder: the payload decoder.
        queue: where valid records go.
        stats: counters to update.
        pressure: the backpressure level (request-reply writes are refused and pulls
            stop at ``hard``), told the client's backlog.
    """

    nc: NATS
    settings: Settings
    decoder: PayloadDecoder
    queue: RecordQueue
    stats: Stats
    pressure: Pressure


class Intake(Protocol):
    """How the service drives an intake (core or JetStream)."""

    async def start(self, timeout: float = 5.0) -> None:
        """Start taking writes (also after a pause); each request to the server that
        setting up takes (JetStream's checks) may take ``timeout`` seconds."""
        ...

    async def stop(self, timeout: float) -> None:
        """Stop taking writes; those already delivered are still handled."""
        ...

    async def close(self) -> None:
        """Release what intake still holds once the batcher has finished."""
        ...

    def sink_state(self, down: bool) -> None:
        """The database started (True) or stopped (False) failing commits."""
        ...

    def reconnected(self) -> None:
        """The NATS connection came back."""
        ...


class MessageSize:
    """Records per message, smoothed: turns a backlog of messages into records and
    sizes JetStream pull requests.

    Args:
        initial: the estimate before any message was seen.
    """

    __slots__ = ("value",)

    def __init__(self, initial: float) -> None:
        self.value = initial

    def observe(self, records: int) -> None:
        """Fold one message's record count into the estimate."""
        self.value += (records - self.value) / 16


def group_limit(settings: Settings) -> int:
    """The most records an envelope of several messages may hold: never more than a
    batch, nor a quarter of the queue (the watermarks stay fine-grained with a small
    queue). A single message larger than that is still one envelope."""
    return max(1, min(settings.batch_size, settings.queue_capacity // 4))


class RecordGroup:
    """The valid records of consecutive messages of one kind, becoming one envelope.

    ``ends[i]`` is where the rows of the group's i-th message end. Each intake adds
    what it needs to answer its messages.

    Args:
        kind: the record kind.
        received: loop time of the take the messages came in.
    """

    __slots__ = ("ends", "kind", "received", "rows")

    def __init__(self, kind: str, received: float) -> None:
        self.kind = kind
        self.received = received
        self.rows: list[Row] = []
        self.ends: list[int] = []

    def fits(self, kind: str, rows: int, most: int) -> bool:
        """Whether a message of ``rows`` records of ``kind`` may join (``most``:
        :func:`group_limit`)."""
        return kind == self.kind and len(self.rows) + rows <= most

    def add(self, rows: list[Row]) -> int:
        """Add one message's rows; returns the message's index in the group."""
        self.rows.extend(rows)
        self.ends.append(len(self.rows))
        return len(self.ends) - 1

    def slices(self) -> list[list[Row]]:
        """The rows of each message, in order."""
        starts = [0, *self.ends[:-1]]
        return [self.rows[a:b] for a, b in zip(starts, self.ends, strict=True)]


class WriteEdge:
    """Decodes write messages, routes their rejects to the DLQ and counts them.

    Args:
        parts: the intake's parts (client, settings, decoder, stats).
        refuse: what to do with a message that has nothing usable in it (its
            records are on the DLQ by then).
    """

    def __init__(self, parts: IntakeParts, refuse: Refuse) -> None:
        self._nc = parts.nc
        self._decoder = parts.decoder
        self._stats = parts.stats
        self._refuse = refuse
        self.write_prefix = parts.settings.subject("store", "write") + "."
        self._dlq_prefix = parts.settings.subject("store", "dlq") + "."

    @property
    def subject(self) -> str:
        """The wildcard subject of every write."""
        return self.write_prefix + ">"

    def clean(self, msg: WriteMessage, now: datetime) -> tuple[str, Decoded] | None:
        """Decode a write message whose every record is valid, without a suspension.

        Args:
            msg: the write message.
            now: when it was taken off the connection (aware UTC).

        Returns:
            ``(kind, decoded)`` when the message decodes with no reject, counted as
            received; None for anything else, which :meth:`examine` then handles
            (decoding it again: bad input is rare, and its cost stays its own).
        """
        subject = msg.subject
        kind, _, symbol = subject[len(self.write_prefix) :].partition(".")
        try:
            decoded = self._decoder.decode(kind, symbol or None, msg.data, msg.headers, now)
        except Exception:  # RejectedInput or a decoder bug: examine() reports it
            return None
        if decoded.rejects or not decoded.rows:
            return None
        self._stats.received[kind] += len(decoded.rows)
        return kind, decoded

    async def examine(self, msg: WriteMessage) -> tuple[str, Decoded | None]:
        """Decode and validate a write message; send its rejects to the DLQ.

        Args:
            msg: the write message.

        Returns:
            ``(kind, decoded)`` with at least one valid row, or ``(kind, None)`` when
            nothing in the message is usable (already handed to ``refuse``).
        """
        subject = msg.subject
        tail = subject[len(self.write_prefix) :]
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
                await self.to_dlq(kind, subject, reject, msg.headers)
            else:  # counted, not republished one by one: one message cannot flood the DLQ
                self._stats.rejected[reject.reason] += 1
                self._stats.rejected_by_kind[kind] += 1
        if not decoded.rows:
            await self._refuse(msg, decoded.rejects)
            return kind, None
        return kind, decoded

    async def _reject_message(self, msg: WriteMessage, kind: str, rej: RejectedInput) -> None:
        self._stats.received[kind_or_unknown(kind)] += 1
        reject = Reject(rej.reason, rej.detail, msg.data)
        await self.to_dlq(kind, msg.subject, reject, msg.headers)
        await self._refuse(msg, [reject])

    async def error_reply(
        self,
        reply: str,
        code: int,
        reason: str,
        detail: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer a request-reply write with an ADR-32 service error.

        Args:
            reply: the write's reply subject.
            code: the error code (400, 500, 503).
            reason: the stable reason code.
            detail: what went wrong, for the publisher (never a driver's text).
            body: the reply body (a write reply listing the rejects, or empty).
            headers: extra headers (``Store-Retry-After-Ms``).
        """
        out = {**error_headers(code, reason, detail), **(headers or {})}
        try:
            await self._nc.publish(reply, body, headers=out)
        except NatsError as exc:
            log.warning("could not send an error reply: %s", exc)

    async def to_dlq(
        self,
        kind: str,
        subject: str,
        rej: Reject,
        headers: dict[str, str] | None,
        count: bool = True,
    ) -> None:
        """Publish one rejected record (or message) on ``<prefix>.store.dlq.<kind>``.

        Args:
            kind: the kind token of the write subject (``unknown`` when it names none).
            subject: the original subject.
            rej: the reject: reason, detail and the original bytes.
            headers: the original message's headers (its ``Content-Type`` is kept).
            count: whether to count it as rejected (False when it was counted already).
        """
        dlq_kind = kind_or_unknown(kind)
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


async def drain_subscription(sub: Subscription, timeout: float) -> None:
    """Drain ``sub`` (messages already delivered are still handled) within ``timeout``;
    past it, or on a closed connection, unsubscribe instead.

    Args:
        sub: the subscription.
        timeout: seconds to wait for the delivered messages to be handled.
    """
    try:
        async with asyncio.timeout(timeout):
            await sub.drain()  # type: ignore[no-untyped-call]
    except TimeoutError:
        log.warning(
            "intake drain timed out after %.1fs; messages still held by the client are refused",
            timeout,
        )
        await _unsubscribe(sub)
    except NatsError as exc:  # closed or draining connection: nothing more will arrive
        log.warning("intake drain failed (%s); unsubscribing", exc)
        await _unsubscribe(sub)


async def _unsubscribe(sub: Subscription) -> None:
    # A closed connection has taken the subscription with it already.
    with contextlib.suppress(NatsError):
        await sub.unsubscribe()
    # A drain cut short marks the subscription closed, and unsubscribe() then refuses
    # it (BadSubscriptionError) and leaves it with the client: it would be made again
    # at the next reconnect, join the queue group and take writes nobody reads.
    nc: Any = sub._conn
    if sub._id in nc._subs:
        nc._remove_sub(sub._id)
        with contextlib.suppress(NatsError):
            await nc._send_unsubscribe(sub._id)
