"""JetStream intake: a durable pull consumer, acked only after commit.

The service keeps pull requests outstanding on the consumer's ``MSG.NEXT`` subject
with its own inbox, rather than using nats-py's ``fetch``: a new request goes out
when half of the last one has arrived, so delivery never stops between pulls, and
every request asks for idle heartbeats, so a request the server has forgotten (a
restart, a failover, a reconnect) is noticed within two heartbeats and replaced.
That covers the known nats-py troubles of pulls that stop after a server restart
and of a fetch that stalls when a heartbeat arrives.

Each message is decoded and validated like a core write. Its valid records are
queued with an ``ack`` that runs after their commit; a message with nothing usable
is terminated (its records are on the DLQ); a message whose rows the database
refuses for good is put on the DLQ whole and terminated. Messages held longer than
half the ack wait (queued behind a slow commit) are kept alive with
``in_progress``. At the hard watermark, or while paused, no new requests go out.
Messages handed back unprocessed (stopping) are nak'd so another instance gets
them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from store_svc.bus.client import OrderedFlushClient
from store_svc.bus.receive import Incoming, Receiver
from store_svc.core import BackpressureLevel
from store_svc.errors import ConfigError, JetStreamUnavailable
from store_svc.ingest.decode import Reject
from store_svc.ingest.edge import (
    IntakeParts,
    MessageSize,
    RecordGroup,
    WriteEdge,
    drain_subscription,
    group_limit,
)
from store_svc.ingest.intake import TAKE_MOST
from store_svc.ingest.jetstream_setup import ensure_stream_and_consumer
from store_svc.ingest.queue import Envelope, QueueClosed
from store_svc.kinds import Row
from store_svc.tasks import TaskSet, Turns, cancel_and_wait, reraise_swallowed_cancel

__all__ = ["JetStreamIntake", "delivery_count", "pull_size", "room_needed"]

log = logging.getLogger(__name__)

_encode = msgspec.json.encode
_NS = 1_000_000_000
#: Seconds each info request of a check of stream and consumer may take once intake
#: runs (a pull request found no responder, a consumer gone): short, so pulling
#: resumes soon after a cluster has elected a new leader; and the pause after a check
#: that went unanswered.
RECHECK_TIMEOUT_S = 1.0
RECHECK_PAUSE_S = 0.5
#: The first pause before asking again when pull requests find no responder while the
#: consumer is there (doubled each time, to 1 s).
UNSERVED_PAUSE_S = 0.05
# Plain strings: nats-py's Header enum hashes by member name, so it misses dict keys.
_STATUS = "Status"
_DESCRIPTION = "Description"
#: The bodies of JetStream's acknowledgements (as nats-py's ``Msg`` sends them).
_ACK = b""
_NAK = b"-NAK"
_PROGRESS = b"+WPI"
_TERM = b"+TERM"


def pull_size(room: int, per_msg: float, batch: int) -> int:
    """How many messages a pull request may ask for in all (those outstanding
    included): what fits in ``room`` records at ``per_msg`` records a message, at
    least one while there is any room, at most ``batch``."""
    return min(batch, max(1, int(room / per_msg))) if room > 0 else 0


def room_needed(outstanding: int, per_msg: float, batch: int) -> int:
    """The least room (records below the soft mark) at which :func:`pull_size` allows
    one message more than the ``outstanding`` ones (``outstanding < batch``)."""
    need = 1 if outstanding == 0 else max(1, math.ceil((outstanding + 1) * per_msg))
    # Float rounding may put the product a record off pull_size's own division:
    # settle on exactly the room pull_size agrees with, or the wait would spin.
    while pull_size(need, per_msg, batch) <= outstanding:
        need += 1
    while need > 1 and pull_size(need - 1, per_msg, batch) > outstanding:
        need -= 1
    return need


class _Held:
    """A message taken and not yet acked: its envelope and when it was last touched."""

    __slots__ = ("env", "msg", "touched")

    def __init__(self, msg: Incoming, env: Envelope, touched: float) -> None:
        self.msg = msg
        self.env = env
        self.touched = touched


class _Group(RecordGroup):
    """A group of JetStream deliveries: ``msgs`` are its messages, in order."""

    __slots__ = ("held", "msgs")

    def __init__(self, kind: str, received: float) -> None:
        super().__init__(kind, received)
        #: Its messages are in the intake's held set (being queued, or queued).
        self.held = False
        self.msgs: list[Incoming] = []


def delivery_count(reply: str | None) -> int | None:
    """How many times JetStream has delivered a message, read from its ack subject.

    Args:
        reply: the message's reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>...``
            (or the longer form with domain and account hash).

    Returns:
        The delivery count, or ``None`` when ``reply`` is no JetStream ack subject.
    """
    if not reply or not reply.startswith("$JS.ACK."):
        return None
    tokens = reply.split(".")
    token = tokens[4] if len(tokens) == 9 else tokens[6] if len(tokens) >= 11 else ""
    return int(token) if token.isdigit() else None


class JetStreamIntake:
    """Takes writes from a durable JetStream pull consumer shared by every instance.

    Args:
        parts: client, settings (the ``js_*`` ones), decoder, queue, counters and
            backpressure (no pulls at ``hard``).
    """

    def __init__(self, parts: IntakeParts) -> None:
        settings = parts.settings
        if not isinstance(parts.nc, OrderedFlushClient):
            raise TypeError("JetStream intake needs the service's client (bus.client)")
        self._nc: OrderedFlushClient = parts.nc
        self._settings = settings
        self._queue = parts.queue
        self._stats = parts.stats
        self._pressure = parts.pressure
        self._edge = WriteEdge(parts, self._refuse)
        self._sub: Subscription | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._receiver: Receiver | None = None
        self._draining: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._turns = Turns()
        self._tasks = TaskSet("jetstream")
        self._group_most = group_limit(settings)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.js_stream}.{settings.js_durable}"
        self._batch = settings.js_fetch_batch
        self._expires = settings.js_fetch_expires_s
        self._heartbeat = self._expires / 4
        self._inbox = ""
        self._pulling = False
        self._taking = False
        self._outstanding = 0
        # Start cautious (large messages assumed): the estimate falls within a few
        # dozen messages when they are small, and the first request cannot overfill.
        self._size = MessageSize(1000.0)
        self._last_activity = 0.0
        self._recheck_consumer = False
        #: Pull requests in a row that found no responder (503; since
        #: ``stats.js_unserved_since``), and the last "not usable" error logged.
        self._unserved = 0
        self._unusable = ""
        #: A pause the pull loop takes before its next request (a refused request).
        self._pause_next = 0.0
        #: Set while the pull loop waits for room: each delivery lowers the room the
        #: next request needs, and one after which the queue has that room wakes it.
        self._room_blocked = False
        self._soft_records = int(settings.queue_capacity * settings.soft_watermark)
        self._wake = asyncio.Event()
        #: Messages taken and not yet acked, terminated or nak'd, by reply subject.
        self._held: dict[str, _Held] = {}

    @property
    def subject(self) -> str:
        """The wildcard subject the stream captures."""
        return self._edge.subject

    @property
    def held(self) -> int:
        """Messages taken and not yet acked (queued or being committed)."""
        return len(self._held)

    @property
    def outstanding(self) -> int:
        """Messages asked for and not yet delivered."""
        return self._outstanding

    @property
    def inbox(self) -> str:
        """The subject pulled messages arrive on."""
        return self._inbox

    def reconnected(self) -> None:
        """Open pull requests may be gone with the old connection: ask again now."""
        if self._outstanding:
            self._outstanding = 0
            self._stats.js_pull_resets += 1
        self._wake.set()

    async def start(self, timeout: float = 5.0) -> None:
        """Make sure the stream and consumer exist, then start pulling.

        Args:
            timeout: seconds each request of that check (and creation) may take.

        Raises:
            JetStreamUnanswered: JetStream did not answer in time, or is not available
                yet (asking again may succeed).
            JetStreamUnavailable: the server has no JetStream, or refused the set-up.
            ConfigError: the stream or consumer is missing and ``js_create`` is off.
        """
        await self._ensure(timeout, timeout)
        self._forget_faults()
        self._inbox = self._nc.new_inbox()
        self._sub, receiver = await self._nc.subscribe_batched(
            self._inbox,
            "",
            self._settings.write_pending_msgs,
            self._settings.write_pending_bytes,
        )
        self._receiver = receiver
        self._consumer = asyncio.create_task(self._consume(receiver), name="jetstream-intake")
        await self._nc.flush()
        self._outstanding = 0
        self._pulling = self._taking = True
        self._tasks.start("pull", self._pull())
        if not self._tasks.running("keepalive"):
            self._tasks.start("keepalive", self._keep_alive())
        log.info(
            "pulling from stream %s, consumer %s (%s)",
            self._settings.js_stream,
            self._settings.js_durable,
            self.subject,
        )

    async def _ensure(self, check_timeout: float, create_timeout: float = 5.0) -> None:
        await ensure_stream_and_consumer(
            self._nc, self._settings, self.subject, check_timeout, create_timeout
        )

    async def _pull(self) -> None:
        """Keep pull requests outstanding while intake runs and the level allows."""
        loop = asyncio.get_running_loop()
        quiet_limit = 2 * self._heartbeat + 0.5
        expires = int(self._expires * _NS)
        heartbeat = int(self._heartbeat * _NS)
        # Ask only for what fits below the soft mark: the backlog waits in the stream,
        # not in memory (a request for 256 messages of 1,000 records would otherwise
        # bring 256,000 records into a 100,000-record queue).
        soft_records = self._soft_records
        stats = self._stats
        backoff = 0.0
        while self._pulling:
            reraise_swallowed_cancel()  # a request or publish can swallow it
            if self._pause_next:
                backoff, self._pause_next = max(backoff, self._pause_next), 0.0
            if backoff:
                await asyncio.sleep(backoff)
                backoff = 0.0
            now = loop.time()
            if self._outstanding and now - self._last_activity > quiet_limit:
                # Neither messages nor heartbeats: the server has forgotten the request.
                log.info("a pull request went quiet; asking again")
                self._stats.js_pull_resets += 1
                self._outstanding = 0
            if self._recheck_consumer:
                self._recheck_consumer = False
                try:
                    await self._ensure(RECHECK_TIMEOUT_S)
                except ConfigError as exc:
                    self._answered()  # it answered: the stream or consumer is missing
                    if str(exc) != self._unusable:
                        self._unusable = str(exc)
                        log.error("the JetStream consumer is not usable: %s", exc)
                    backoff = 1.0
                    continue
                except JetStreamUnavailable as exc:
                    # Asked again, before any pull: on a cluster this is a leader
                    # election (4-9 s measured); logged once until JetStream answers.
                    self._recheck_consumer = True
                    if stats.js_unanswered_since is None:
                        stats.js_unanswered_since = loop.time()
                        log.warning(
                            "JetStream does not answer for stream %s (%s); asking again until "
                            "it does (on a cluster, electing a new leader takes seconds)",
                            self._settings.js_stream,
                            exc.__cause__ or exc,
                        )
                    backoff = RECHECK_PAUSE_S
                    continue
                self._answered()
                self._unusable = ""
                if self._unserved:
                    # The consumer is there but its requests found no one: give its
                    # leader time (a new R3 consumer, an election) before asking again.
                    backoff = UNSERVED_PAUSE_S * 2 ** min(self._unserved - 1, 5)
                    backoff = min(backoff, 1.0)
                    continue
            per_msg = self._size.value
            want = pull_size(soft_records - self._queue.depth, per_msg, self._batch)
            blocked_by_room = want - self._outstanding < 1 and self._outstanding < self._batch
            if (
                not blocked_by_room
                and self._outstanding <= want // 2
                and self._pressure.level is not BackpressureLevel.hard
                and self._nc.is_connected
            ):
                n = want - self._outstanding
                request = _encode({"batch": n, "expires": expires, "idle_heartbeat": heartbeat})
                try:
                    await self._nc.publish(self._next_subject, request, reply=self._inbox)
                except NatsError as exc:
                    log.debug("pull request not sent: %s", exc)
                    backoff = 0.1
                    continue
                self._stats.js_pull_requests += 1
                if not self._outstanding:
                    self._last_activity = now
                self._outstanding += n
            # Woken by a delivery or a status, by the take that frees the room the next
            # request needs when room is what is missing, or to look for a quiet request.
            room_below = self._room_below() if blocked_by_room and not self._queue.closed else None
            self._room_blocked = blocked_by_room
            try:
                await self._woken(min(self._heartbeat, 0.25), room_below=room_below)
            finally:
                self._room_blocked = False

    async def _consume(self, receiver: Receiver) -> None:
        """Take the inbox's deliveries, many at a time, until it is closed and empty."""
        while True:
            await receiver.wait()
            items = receiver.take(TAKE_MOST)
            if not items:
                return  # closed, and everything handled
            try:
                await self._deliveries(items)
            except Exception:  # a bug must cost these messages (redelivered), not intake
                log.exception("unexpected error handling %d JetStream deliveries", len(items))
            await self._turns.take()

    async def _deliveries(self, items: list[Incoming]) -> None:
        stats = self._stats
        received = self._loop.time()
        now = datetime.now(UTC)
        edge = self._edge
        observe = self._size.observe
        most = self._group_most
        group: _Group | None = None
        tail = 0
        try:
            for index, msg in enumerate(items):
                tail = index
                if self._turns.due():
                    await self._turns.take()
                headers = msg.headers
                if not msg.data and headers and _STATUS in headers:
                    self._on_status(headers)
                    tail = index + 1
                    continue
                self._last_activity = received
                if self._unserved or stats.js_refused:
                    self._served_again()
                if self._outstanding:
                    self._outstanding -= 1
                if not self._taking:
                    tail = index + 1
                    await self._nak(msg)
                    continue
                stats.messages += 1
                delivered = delivery_count(msg.reply)
                if delivered is None:  # not from the consumer (someone wrote to the inbox)
                    log.warning(
                        "ignored a message without a JetStream ack subject on %s", msg.subject
                    )
                    tail = index + 1
                    continue
                if delivered > 1:
                    stats.js_redelivered += 1
                found = edge.clean(msg, now)
                if found is None:
                    kind, decoded = await edge.examine(msg)
                    if decoded is None:  # terminated, its records on the DLQ
                        tail = index + 1
                        continue
                else:
                    kind, decoded = found
                rows = decoded.rows
                observe(len(rows))  # sizes the next pull requests
                if group is not None and not group.fits(kind, len(rows), most):
                    await self._put(group)
                    group = None
                if group is None:
                    group = _Group(kind, received)
                stats.accepted[kind] += len(rows)
                group.add(rows)
                group.msgs.append(msg)
                tail = index + 1
            tail = len(items)
            if group is not None:
                await self._put(group)
                group = None
        except asyncio.CancelledError:
            # Stopped mid-take: what was not queued is handed back at once.
            # The group's messages, but those it already handed back (QueueClosed).
            unqueued = (
                []
                if group is None
                else [m for m in group.msgs if not group.held or m.reply in self._held]
            )
            if group is not None:
                stats.accepted[group.kind] -= len(group.rows)
            await self._hand_back_now([*unqueued, *items[tail:]])
            raise
        if self._outstanding <= self._batch // 2 or (
            self._room_blocked
            and (below := self._room_below()) is not None
            and self._queue.depth < below
        ):
            self._wake.set()

    async def _put(self, group: _Group) -> None:
        env = self._envelope(group.kind, group.rows, group.msgs, group.received)
        if len(group.msgs) > 1:
            env.split = self._splitter(group)
        for msg in group.msgs:
            self._held[msg.reply] = _Held(msg, env, group.received)
        group.held = True
        try:
            await self._queue.put(env)
        except QueueClosed:
            self._stats.accepted[group.kind] -= len(group.rows)
            for msg in group.msgs:
                await self._nak(msg)

    def _envelope(
        self, kind: str, rows: list[Row], msgs: list[Incoming], received: float
    ) -> Envelope:
        return Envelope(kind, rows, received, self._acker(msgs), self._failer(msgs, kind))

    def _splitter(self, group: _Group) -> Any:
        def split() -> list[Envelope]:
            return [
                self._envelope(group.kind, rows, [msg], group.received)
                for msg, rows in zip(group.msgs, group.slices(), strict=True)
            ]

        return split

    async def _hand_back_now(self, msgs: list[Incoming]) -> None:
        """Nak ``msgs`` (those with an ack subject) in one write; never raises."""
        body = self._nak_body()
        naks = [(m.reply, body) for m in msgs if delivery_count(m.reply) is not None]
        for reply, _ in naks:
            self._held.pop(reply, None)
        try:
            await self._nc.publish_many(naks)
        except NatsError as exc:
            log.warning("handing %d messages back (nak) failed: %s", len(naks), exc)
            return
        self._stats.js_naked += len(naks)

    def _room_below(self) -> int | None:
        """The queue depth below which the next pull request has the room it needs
        (``None`` when no depth gives it: then only deliveries can)."""
        need = room_needed(self._outstanding, self._size.value, self._batch)
        below = self._soft_records - need + 1
        return below if below > 0 else None

    async def _woken(self, timeout: float, room_below: int | None = None) -> None:
        """Wait for a delivery or status (``_wake``), or with ``room_below`` for the
        queue to hold fewer records than that, at most ``timeout`` seconds."""
        self._wake.clear()
        if room_below is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            return
        waits = {
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._queue.wait_room(room_below)),
        }
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _on_status(self, headers: dict[str, str]) -> None:
        self._last_activity = self._loop.time()
        code = headers.get(_STATUS, "")
        if code == "100":  # idle heartbeat: the request is alive
            if self._unserved or self._stats.js_refused:
                self._served_again()
            return
        description = headers.get(_DESCRIPTION, "")
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None and pending.isdigit():
            self._outstanding = max(0, self._outstanding - int(pending))
        else:
            self._outstanding = 0
        if code == "503":
            # No one serves the consumer's pull requests: it is gone, or (a cluster)
            # has no leader yet, which its info does not show. Checked, then asked
            # again after a pause that grows while it lasts; logged once.
            if not self._unserved:
                self._stats.js_unserved_since = self._loop.time()
                log.warning(
                    "pull requests to consumer %s find no responder (503); checking it "
                    "and asking again",
                    self._settings.js_durable,
                )
            self._unserved += 1
            self._recheck_consumer = True
        elif code in ("404", "408") and "Consumer" not in description:
            if self._unserved or self._stats.js_refused:  # expired, as requests do
                self._served_again()
        elif "Leadership Change" in description or "Consumer Deleted" in description:
            # Once per open request at such an event: asked again at once.
            log.warning("pull request ended: %s %s", code, description)
            # A check still to be made (one went unanswered) stays due: only it can
            # end the "JetStream does not answer" stretch.
            self._recheck_consumer |= "Consumer" in description
        else:
            # Refused, as every request will be until an operator changes the consumer
            # (a request limit below STORE_JS_FETCH_BATCH, a push consumer ...): asked
            # again each second, logged once per reason, shown in health.
            reason = f"{code} {description}".strip()[:200]
            if reason != self._stats.js_refused:
                self._stats.js_refused = reason
                log.warning(
                    "pull requests to consumer %s are refused (%s); asking again each second",
                    self._settings.js_durable,
                    reason,
                )
            self._pause_next = 1.0
            self._recheck_consumer |= "Consumer" in description
        self._wake.set()

    def _served_again(self) -> None:
        """A pull request was served after some found no responder or were refused."""
        stats = self._stats
        if self._unserved:
            since = stats.js_unserved_since
            log.info(
                "pull requests to consumer %s are served again (%d found no responder over %.1f s)",
                self._settings.js_durable,
                self._unserved,
                self._loop.time() - (since if since is not None else self._loop.time()),
            )
        if stats.js_refused:
            log.info("pull requests to consumer %s are served again", self._settings.js_durable)
        self._unserved = 0
        self._unusable = ""
        stats.js_unserved_since = None
        stats.js_refused = ""

    def _answered(self) -> None:
        """A check of the stream and consumer was answered."""
        if self._stats.js_unanswered_since is not None:
            self._stats.js_unanswered_since = None
            log.info("JetStream answers again (stream %s)", self._settings.js_stream)

    def _forget_faults(self) -> None:
        """Intake stopped (a pause): no stretch of faults is open any more."""
        self._recheck_consumer = False
        self._unserved = 0
        self._unusable = ""
        self._pause_next = 0.0
        self._stats.js_unserved_since = None
        self._stats.js_unanswered_since = None
        self._stats.js_refused = ""

    def _acker(self, msgs: list[Incoming]) -> Any:
        async def ack() -> None:
            # A message handed back while its commit was under way is acked where it
            # was redelivered (the repeat upsert is harmless): not here.
            held = self._held
            acks = [(m.reply, _ACK) for m in msgs if held.pop(m.reply, None) is not None]
            await self._nc.publish_many(acks)
            self._stats.js_acked += len(acks)

        return ack

    def _failer(self, msgs: list[Incoming], kind: str) -> Any:
        async def fail(reason: str) -> None:
            # The database refuses these rows for good: keep the messages on the DLQ,
            # and stop the server from redelivering them for ever.
            for msg in msgs:
                self._held.pop(msg.reply, None)
                await self._edge.to_dlq(
                    kind, msg.subject, Reject("sink_refused", reason, msg.data), msg.headers, False
                )
                await self._term(msg)

        return fail

    async def _refuse(self, msg: Incoming, rejects: list[Reject]) -> None:
        # Nothing in the message is usable (its records are on the DLQ): terminate it.
        await self._term(msg)

    async def _term(self, msg: Incoming) -> None:
        try:
            await self._nc.publish(msg.reply, _TERM)
            self._stats.js_termed += 1
        except NatsError as exc:
            log.warning("terminating a message failed: %s", exc)

    def _nak_body(self) -> bytes:
        """A nak, with the redelivery delay ``STORE_JS_NAK_DELAY_S`` when one is set."""
        delay = self._settings.js_nak_delay_s
        return _NAK + b" " + _encode({"delay": int(delay * _NS)}) if delay else _NAK

    async def _nak(self, msg: Incoming) -> None:
        self._held.pop(msg.reply, None)
        try:
            await self._nc.publish(msg.reply, self._nak_body())
            self._stats.js_naked += 1
        except NatsError as exc:
            log.warning("handing a message back (nak) failed: %s", exc)

    async def _keep_alive(self) -> None:
        """Tell the server that messages held longer than half the ack wait are in work."""
        ack_wait = self._settings.js_ack_wait_s
        while True:
            reraise_swallowed_cancel()  # a publish can swallow the cancellation
            await asyncio.sleep(ack_wait / 4)
            now = self._loop.time()
            stale = [h for h in self._held.values() if now - h.touched > ack_wait / 2]
            for held in stale:
                if held.msg.reply not in self._held:
                    continue  # acked meanwhile
                try:
                    await self._nc.publish(held.msg.reply, _PROGRESS)
                except NatsError as exc:
                    log.debug("in_progress not sent: %s", exc)
                    break
                held.touched = now
                self._stats.js_in_progress += 1

    async def stop(self, timeout: float) -> None:
        """Stop pulling; what the open requests still deliver is queued, later ones nak'd.

        Args:
            timeout: seconds to wait for the open requests to end.
        """
        if self._draining is not None:
            await asyncio.shield(self._draining)
            return
        if not self._pulling:
            return
        self._draining = asyncio.ensure_future(self._stop(timeout))
        try:
            await asyncio.shield(self._draining)
        finally:
            self._draining = None

    async def _stop(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._pulling = False
        self._wake.set()
        await self._tasks.stop("pull")
        # Open requests end within their expiry; until then their messages are taken.
        wait_until = min(deadline, loop.time() + self._expires + 0.5)
        while self._outstanding and self._nc.is_connected and loop.time() < wait_until:
            await self._woken(min(0.1, max(0.0, wait_until - loop.time())))
        self._taking = False
        sub, self._sub = self._sub, None
        if sub is not None:
            # Anything still on its way is handed back (nak) as it arrives.
            await drain_subscription(sub, max(0.1, deadline - loop.time()))
            self._nc.unbatch(sub)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # What the drain brought in is taken (handed back) before the task ends.
            receiver, self._receiver = self._receiver, None
            if receiver is not None:
                receiver.close()
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await asyncio.shield(consumer)
            except TimeoutError:
                await cancel_and_wait(consumer)
                if receiver is not None:
                    await self._hand_back_now(receiver.take(receiver.pending_msgs))
        self._outstanding = 0
        self._forget_faults()

    async def close(self) -> None:
        """Hand back (nak) every message still held, and end every background task."""
        consumer, self._consumer = self._consumer, None
        await cancel_and_wait(consumer)
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            await self._hand_back_now(receiver.take(receiver.pending_msgs))
        await self._tasks.close()
        held = [h.msg for h in self._held.values()]
        for msg in held:
            await self._nak(msg)
        if held:
            log.warning("handed back %d uncommitted messages for redelivery", len(held))

    def sink_state(self, down: bool) -> None:
        """The database started (True) or stopped (False) failing commits.

        After ``js_handback_after_s`` of failures, held messages are handed back so
        an instance that can reach its database stores them.
        """
        after = self._settings.js_handback_after_s
        if down and after > 0 and not self._tasks.running("handback"):
            self._tasks.start("handback", self._hand_back(after))
        elif not down:
            self._tasks.cancel("handback")  # awaited by close()

    async def _hand_back(self, after: float) -> None:
        await asyncio.sleep(after)
        while True:
            reraise_swallowed_cancel()  # a nak's publish can swallow the cancellation
            held = list(self._held.values())
            for h in held:
                h.env.withdrawn = True
                await self._nak(h.msg)
            if held:
                log.warning(
                    "the database has failed commits for %.0fs: handed back %d messages "
                    "for another instance to store",
                    after,
                    len(held),
                )
            # What open pull requests still deliver is handed back too.
            await asyncio.sleep(self._heartbeat)
