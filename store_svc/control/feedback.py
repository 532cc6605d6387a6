"""Feedback: queue depth → Core ``FeedbackEvent`` on ``<prefix>.telemetry.feedback``.

:class:`FeedbackLoop` watches the queue depth (the queue calls :meth:`on_depth` on
every change; the common case returns after one comparison), runs the
:class:`~store_svc.ingest.backpressure.Watermarks` state machine, and hands every level
change, and the current level on a heartbeat, to a Core ``FeedbackPublisher``
from a task of its own. Publishing therefore never blocks the queue or the batcher:
a slow or disconnected NATS only delays telemetry. Undelivered events are kept in a
short buffer, oldest dropped first, since only the newest state matters. Further
outlets (Redis) are offered each event as it is made, so they hear it whatever
becomes of the NATS publish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

from nats.aio.client import Client as NATS

from store_svc.constants import (
    FEEDBACK_SCHEMA_ID,
    SCHEMA_ID_HEADER,
    SCHEMA_TRACK,
    SCHEMA_TRACK_HEADER,
)
from store_svc.core import BackpressureLevel, FeedbackEvent, FeedbackPublisher
from store_svc.ingest.backpressure import Marks, Watermarks
from store_svc.settings import Settings
from store_svc.tasks import reraise_swallowed_cancel

__all__ = ["FeedbackLoop", "NatsFeedbackPublisher", "Outlet"]

log = logging.getLogger(__name__)

#: Events kept while the publisher is slow or NATS is away (oldest dropped first).
MAX_PENDING_EVENTS = 64


class Outlet(Protocol):
    """A further destination of feedback events that buffers on its own."""

    def offer(self, event: FeedbackEvent) -> None:
        """Take ``event`` without blocking (a full buffer drops its oldest)."""
        ...


class NatsFeedbackPublisher:
    """Core's ``FeedbackPublisher`` protocol over NATS.

    Args:
        nc: a connected client.
        subject: where events go (``<prefix>.telemetry.feedback``).
    """

    def __init__(self, nc: NATS, subject: str) -> None:
        self._nc = nc
        self.subject = subject
        self._headers = {SCHEMA_ID_HEADER: FEEDBACK_SCHEMA_ID, SCHEMA_TRACK_HEADER: SCHEMA_TRACK}

    async def publish(self, event: FeedbackEvent) -> None:
        """Publish ``event`` as Core's own JSON, with the schema headers.

        Args:
            event: the feedback event.
        """
        await self._nc.publish(
            self.subject, event.model_dump_json().encode(), headers=self._headers
        )


class FeedbackLoop:
    """Turns queue depth into feedback events and gets them published.

    Args:
        settings: marks, dwell, heartbeat and coordinator id.
        capacity: queue capacity in records.
        publisher: where events go; may be set later through :attr:`publisher`.
    """

    def __init__(
        self,
        settings: Settings,
        capacity: int,
        publisher: FeedbackPublisher | None = None,
    ) -> None:
        self.capacity = capacity
        self.coordinator_id = settings.coordinator_id
        self.heartbeat = settings.feedback_heartbeat_s
        self.publisher = publisher
        self.marks = Marks.from_fractions(
            capacity,
            settings.soft_watermark,
            settings.hard_watermark,
            settings.soft_recovery,
            settings.hard_recovery,
        )
        self._soft = self.marks.soft
        self._wm = Watermarks(self.marks, settings.feedback_min_dwell_ms / 1000, time.monotonic())
        self.depth = 0
        #: Records (estimated) still waiting in the NATS client in front of the queue:
        #: under a flood the backlog builds there, not in the queue, and feedback that
        #: watched only the queue would say ``ok`` while the client drops messages.
        self.backlog = 0
        self.published = 0
        self.failed = 0
        self._pending: deque[FeedbackEvent] = deque(maxlen=MAX_PENDING_EVENTS)
        #: Further outlets (Redis): each gets every event as it is made, whatever
        #: becomes of the publisher's attempts; their ``offer`` must not block.
        self.outlets: list[Outlet] = []
        self._wake = asyncio.Event()
        self._recheck: asyncio.TimerHandle | None = None

    def reconfigure(self, settings: Settings) -> None:
        """Take new marks, dwell and heartbeat (``reload``); the current level stays.

        Args:
            settings: the new settings.
        """
        self.marks = Marks.from_fractions(
            self.capacity,
            settings.soft_watermark,
            settings.hard_watermark,
            settings.soft_recovery,
            settings.hard_recovery,
        )
        self._soft = self.marks.soft
        self._wm.marks = self.marks
        self._wm.min_dwell = settings.feedback_min_dwell_ms / 1000
        self.heartbeat = settings.feedback_heartbeat_s
        self.on_depth(self.depth)

    @property
    def level(self) -> BackpressureLevel:
        """The current level."""
        return self._wm.level

    @property
    def waiting(self) -> int:
        """Records waiting in the store: the queue's and the client's backlog."""
        return self.depth + self.backlog

    def event(self) -> FeedbackEvent:
        """A Core ``FeedbackEvent`` describing the current state."""
        return FeedbackEvent(
            coordinator_id=self.coordinator_id,
            queue_size=self.waiting,
            capacity=self.capacity,
            level=self._wm.level,
            source="store",
            ts=time.time(),
        )

    def set_sink_down(self, down: bool) -> None:
        """Hold the level at ``hard`` while the database fails commits.

        Upstream must slow down during an outage even when traffic is light and the
        queue is far from its marks. Called by the batcher when commits start or
        stop failing.

        Args:
            down: whether commits are failing.
        """
        self._wm.forced = down
        self.on_depth(self.depth, force=True)

    def on_backlog(self, records: int) -> None:
        """Take a new estimate of the records waiting in the NATS client (intake).

        Args:
            records: records received by the client and not yet queued.
        """
        self.backlog = records
        self.on_depth(self.depth)

    def on_depth(self, depth: int, force: bool = False) -> None:
        """Take a new queue depth (called by the queue on every change).

        The marks apply to the queue's depth plus the client's backlog.

        Args:
            depth: records in the queue.
        """
        self.depth = depth
        depth += self.backlog
        wm = self._wm
        if depth < self._soft and wm.level is BackpressureLevel.ok and not force:
            return
        now = time.monotonic()
        for level in wm.update(depth, now):
            self._emit(
                FeedbackEvent(
                    coordinator_id=self.coordinator_id,
                    queue_size=depth,
                    capacity=self.capacity,
                    level=level,
                    source="store",
                    ts=time.time(),
                )
            )
            log.info(
                "backpressure %s at %d records waiting (%d queued)/%d",
                level.value,
                depth,
                self.depth,
                self.capacity,
            )
            self._wake.set()
        due = wm.due(depth)
        if due is not None and self._recheck is None:
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_at(loop.time() + max(0.0, due - now), self._on_recheck)

    def _on_recheck(self) -> None:
        self._recheck = None
        self.on_depth(self.depth)

    async def run(self) -> None:
        """Publish level changes at once and the current level on every heartbeat."""
        while True:
            reraise_swallowed_cancel()  # a publish can swallow the cancellation
            try:
                async with asyncio.timeout(self.heartbeat):
                    await self._wake.wait()
            except TimeoutError:
                self._emit(self.event())
            self._wake.clear()
            await self._flush()

    def _emit(self, event: FeedbackEvent) -> None:
        self._pending.append(event)
        for outlet in self.outlets:
            try:
                outlet.offer(event)
            except Exception as exc:  # one outlet must never silence another
                log.warning("a feedback outlet failed: %s", exc)

    async def _flush(self) -> None:
        while self._pending and self.publisher is not None:
            event = self._pending[0]
            try:
                await self.publisher.publish(event)
            except Exception as exc:  # telemetry must never take the service down
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    log.warning("publishing feedback failed (%d so far): %s", self.failed, exc)
                return
            self._pending.popleft()
            self.published += 1
            reraise_swallowed_cancel()  # the publish may have swallowed it

    def settle(self) -> None:
        """Apply the marks without the dwell (at shutdown, so the last word is true)."""
        self._wm.forced = False
        self._wm.min_dwell = 0.0
        self.on_depth(self.depth, force=True)

    async def announce(self) -> None:
        """Publish the current state now, after any pending events (start-up, shutdown)."""
        self._emit(self.event())
        await self._flush()

    def close(self) -> None:
        """Cancel the dwell timer."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
