"""The service: wires intake, queue, batcher and sink, and owns the lifecycle.

The service holds two NATS connections: *ingest* carries the write traffic (the write
subscription or the JetStream pulls and acks, DLQ copies, write replies) and *control*
carries everything that must answer under a write flood (health, readiness, the micro
service, admin control and audit, the read API, feedback). A backlog of writes in one
socket then never delays a health answer or a feedback event in the other.

Start-up order: HTTP endpoint (metrics, probes) → connect both NATS connections →
health, readiness and control answer (``starting``) → open the sink (schema) → the read
API answers → announce the feedback level → start the batcher → start intake.

Shutdown runs the other way in a fixed order, each step bounded by what is left of
``STORE_SHUTDOWN_GRACE_S``: stop intake (messages already delivered are still handled)
→ close the queue → the batcher flushes, commits, acks and replies → drain the ingest
connection → publish the final feedback state → the read API stops (queries under way
finish) → drain the control connection → close the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from types import TracebackType
from typing import Self

import nats
import pydantic
from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError

from store_svc.bus.connection import NatsConnection
from store_svc.control.admin import AdminControl, NotRunning
from store_svc.control.feedback import FeedbackLoop, NatsFeedbackPublisher
from store_svc.control.metrics import Metrics
from store_svc.control.micro import ControlPlane
from store_svc.control.probes import HealthSnapshot
from store_svc.core import ControlAction, FeedbackPublisher
from store_svc.errors import ConfigError, ShutdownTimeout
from store_svc.ingest.batcher import Batcher
from store_svc.ingest.decode import PayloadDecoder
from store_svc.ingest.intake import CoreIntake
from store_svc.ingest.jetstream import JetStreamIntake
from store_svc.ingest.queue import RecordQueue
from store_svc.ingest.records import KINDS
from store_svc.read.api import QueryApi
from store_svc.settings import RELOADABLE, Settings, reloaded
from store_svc.state import Stats
from store_svc.store.factory import Sink, make_sink
from store_svc.tasks import cancel_and_wait

__all__ = ["Status", "StoreService"]

log = logging.getLogger(__name__)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


class Status(enum.Enum):
    """Where the service is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class StoreService:
    """The ``store-svc`` service.

    Use as an async context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        settings: the service settings.
        sink: a sink to use instead of the one ``settings.database_url`` names.
        feedback_publisher: a Core ``FeedbackPublisher`` to use instead of publishing
            on ``<prefix>.telemetry.feedback``.
    """

    def __init__(
        self,
        settings: Settings,
        sink: Sink | None = None,
        feedback_publisher: FeedbackPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink if sink is not None else make_sink(settings)
        self.stats = Stats()
        self.feedback = FeedbackLoop(settings, settings.queue_capacity, feedback_publisher)
        self.queue = RecordQueue(settings.queue_capacity, on_depth=self.feedback.on_depth)
        self.batcher = Batcher(
            self.queue,
            self.sink,
            self.stats,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval_ms / 1000,
            retry_initial=settings.sink_retry_initial_s,
            retry_max=settings.sink_retry_max_s,
        )
        self.decoder = PayloadDecoder(settings.max_payload_bytes, settings.max_future_skew_s)
        self.status = Status.CREATED
        #: Set when a NATS connection was closed for good while running;
        #: ``store-svc run`` then shuts down and exits with code 1.
        self.connection_lost = asyncio.Event()
        self.ingest_nats = NatsConnection(
            "ingest",
            settings,
            on_lost=self._on_connection_lost,
            on_reconnected=self._on_reconnected,
            on_slow_consumer=self._on_slow_consumer,
        )
        self.control_nats = NatsConnection("control", settings, on_lost=self._on_connection_lost)
        #: Why health is degraded besides its components (e.g. a stream that captures
        #: the write subjects in core mode); empty when nothing is wrong.
        self.warnings: list[str] = []
        self._intake: CoreIntake | None = None
        self._batcher_task: asyncio.Task[None] | None = None
        self._feedback_task: asyncio.Task[None] | None = None
        self.snapshot = HealthSnapshot(settings.loop_stall_s)
        self._snapshot_task: asyncio.Task[None] | None = None
        self.metrics = Metrics(self, self.snapshot)
        self.batcher.on_commit = self.metrics.observe_commit
        self.batcher.on_sink_state = self._on_sink_state
        self.control = ControlPlane(self)
        self.admin = AdminControl(self, self._act)
        self.query: QueryApi | None = None
        self.paused = False
        self._stopped = asyncio.Event()

    @property
    def nc(self) -> NATS:
        """The ingest connection's client (writes, DLQ, write replies, JetStream)."""
        return self.ingest_nats.nc

    @property
    def control_nc(self) -> NATS:
        """The control connection's client (health, micro, admin, reads, telemetry)."""
        return self.control_nats.nc

    async def start(self) -> None:
        """Connect to NATS, open the sink and start taking writes.

        Raises:
            SinkError: the database cannot be opened.
            NatsUnavailable: NATS cannot be reached within ``STORE_NATS_CONNECT_TIMEOUT_S``.
        """
        self.status = Status.STARTING
        self._snapshot_task = asyncio.create_task(self.snapshot.keep_fresh(self), name="snapshot")
        if self.settings.metrics_port is not None:
            try:
                self.metrics.start(self.settings.metrics_port)
            except OSError as exc:
                await cancel_and_wait(self._snapshot_task)
                raise ConfigError(
                    f"cannot serve metrics on port {self.settings.metrics_port}: {exc}"
                ) from exc
        try:
            await self.control_nats.connect()
            await self.ingest_nats.connect()
            control_nc = self.control_nats.nc
            # Health answers from here on: while the database opens (a schema check, a
            # locked file, a slow server) a probe sees "starting" rather than nothing.
            await self.control.start(control_nc)
            await self.admin.start(control_nc)
            await self.sink.open()
            await self._start_query(control_nc)
            if self.feedback.publisher is None:
                self.feedback.publisher = NatsFeedbackPublisher(
                    control_nc, self.settings.subject("telemetry", "feedback")
                )
            await self.feedback.announce()
            self._feedback_task = asyncio.create_task(self.feedback.run(), name="feedback")
            self._batcher_task = asyncio.create_task(self.batcher.run(), name="batcher")
            if self.settings.ingest_mode == "jetstream":
                intake_type: type[CoreIntake] = JetStreamIntake
            else:
                intake_type = CoreIntake
                await self._check_no_stream_captures_writes()
            self._intake = intake_type(
                self.nc, self.settings, self.decoder, self.queue, self.stats, self.feedback
            )
            await self._intake.start()
        except BaseException:
            await self._abort()
            raise
        self.status = Status.RUNNING
        self.snapshot.refresh(self)
        log.info(
            "store-svc running: nats=%s sink=%s queue=%d batch=%d",
            self.nc.connected_url.netloc if self.nc.connected_url else "?",
            self.sink.name,
            self.settings.queue_capacity,
            self.settings.batch_size,
        )

    async def _check_no_stream_captures_writes(self) -> None:
        """Core mode: warn when a JetStream stream also captures the write subjects.

        Such a stream answers every request-reply write with its own PubAck (often
        before the store does, even for junk), so publishers believe writes the store
        refused were stored; and it keeps a copy nobody consumes.
        """
        subject = self.settings.subject("store", "write", ">")
        try:
            reply = await self.control_nc.request(
                "$JS.API.STREAM.NAMES", json.dumps({"subject": subject}).encode(), timeout=2
            )
            names = json.loads(reply.data).get("streams") or []
        except (nats.errors.Error, TimeoutError, ValueError, AttributeError):
            return  # no JetStream on this server (no responders) or no answer: no stream
        if not isinstance(names, list) or not names:
            return
        text = (
            f"JetStream stream(s) {', '.join(map(str, names[:5]))} capture {subject} in "
            "core mode: they answer request-reply writes with their own PubAck, so "
            "publishers may take refused writes as stored; delete them or run in "
            "jetstream mode"
        )
        log.warning("%s", text)
        self.warnings.append(text)

    async def stop(self) -> None:
        """Shut down cleanly within the grace period; idempotent.

        Raises:
            ShutdownTimeout: records were still uncommitted when time ran out (they
                are counted in the exception and the log).
        """
        if self.status is Status.DRAINING:
            await self._stopped.wait()
            return
        if self.status in (Status.STOPPED, Status.CREATED):
            self.status = Status.STOPPED
            return
        self.status = Status.DRAINING
        self.snapshot.refresh(self)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s
        pending = 0

        def left() -> float:
            return max(0.0, deadline - loop.time())

        try:
            if self._intake is not None:
                log.info("stopping intake")
                await self._intake.stop(left() / 2)
            self.queue.close()
            if self._batcher_task is not None:
                log.info("flushing %d queued records", self.queue.depth)
                done, _ = await asyncio.wait({self._batcher_task}, timeout=left())
                if not done:
                    pending = self.queue.depth + self.batcher.in_flight
                    await cancel_and_wait(self._batcher_task)
                    log.error("grace period over: %d records were not committed", pending)
            if self._intake is not None:
                await self._intake.close()  # JetStream: hand back what was not committed
            await self.ingest_nats.drain(left())
            await self._stop_feedback()
            await self._stop_query(left())
            await self._stop_control()
            await self.control_nats.drain(left())
        finally:
            await self.ingest_nats.close()
            await self.control_nats.close()
            await self.sink.close()
            await cancel_and_wait(self._snapshot_task)
            self.metrics.stop()
            self.status = Status.STOPPED
            self._stopped.set()
            log.info(
                "store-svc stopped: %d records committed, %d rejected, "
                "%d messages dropped (%d received)",
                self.stats.committed_total,
                self.stats.rejected_total,
                self.stats.dropped_messages,
                self.stats.messages,
            )
            if self.settings.ingest_mode == "jetstream":
                st = self.stats
                log.info(
                    "JetStream: %d messages acked, %d redelivered to this instance, "
                    "%d terminated, %d handed back",
                    st.js_acked,
                    st.js_redelivered,
                    st.js_termed,
                    st.js_naked,
                )
        if pending:
            raise ShutdownTimeout(pending)

    async def _act(self, action: ControlAction) -> str:
        """Carry out an authorised control action; return what was done."""
        intake = self._intake
        if self.status is not Status.RUNNING or intake is None:
            raise NotRunning(self.status.value)
        if action is ControlAction.pause:
            if self.paused:
                return "intake was already paused"
            self.paused = True
            self.snapshot.refresh(self)
            await intake.stop(self.settings.shutdown_grace_s / 2)
            return f"intake paused; {self.queue.depth} queued records are still being committed"
        if action is ControlAction.resume:
            if not self.paused:
                return "intake was not paused"
            await intake.start()
            self.paused = False
            self.snapshot.refresh(self)
            return "intake resumed"
        try:
            new = reloaded(self.settings)
        except (pydantic.ValidationError, ValueError) as exc:
            raise ValueError(f"reload refused, nothing changed: {_first_error(exc)}") from None
        changed = [
            f"{name} {getattr(self.settings, name)} -> {getattr(new, name)}"
            for name in RELOADABLE
            if getattr(self.settings, name) != getattr(new, name)
        ]
        self.settings = new
        self.batcher.batch_size = new.batch_size
        self.batcher.flush_interval = new.flush_interval_ms / 1000
        self.feedback.reconfigure(new)
        logging.getLogger("store_svc").setLevel(new.log_level)
        return "changed: " + ", ".join(changed) if changed else "nothing changed"

    async def _stop_control(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self.admin.stop()
        with contextlib.suppress(nats.errors.Error):
            await self.control.stop()

    async def _stop_feedback(self) -> None:
        task, self._feedback_task = self._feedback_task, None
        if task is None:
            return
        await cancel_and_wait(task)
        self.feedback.close()
        self.feedback.settle()
        await self.feedback.announce()  # the final state, before the connection drains

    async def _start_query(self, nc: NATS) -> None:
        if not self.settings.query_enabled:
            return
        reader = self.sink.reader(self.settings.query_concurrency)
        if reader is None:
            log.info("the %s sink cannot be queried; no read API", self.sink.name)
            return
        self.query = QueryApi(self, reader)
        await self.query.start(nc)

    async def _stop_query(self, timeout: float) -> None:
        query, self.query = self.query, None
        if query is not None:
            await query.stop(min(self.settings.query_timeout_s, max(0.0, timeout)))

    async def _abort(self) -> None:
        await self._stop_query(0.0)
        await self._stop_control()
        task, self._feedback_task = self._feedback_task, None
        await cancel_and_wait(task)
        self.feedback.close()
        self.queue.close()
        await cancel_and_wait(self._batcher_task)
        await self.ingest_nats.close()
        await self.control_nats.close()
        await self.sink.close()
        await cancel_and_wait(self._snapshot_task)
        self.metrics.stop()
        self.status = Status.STOPPED
        self._stopped.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _on_slow_consumer(self, exc: SlowConsumerError) -> None:
        self.stats.dropped_messages += 1
        tail = (exc.subject or "").removeprefix(self.settings.subject("store", "write") + ".")
        kind = tail.partition(".")[0]
        self.stats.dropped_by_kind[kind if kind in KINDS else "unknown"] += 1
        if self.stats.dropped_messages == 1 or self.stats.dropped_messages % 1000 == 0:
            log.error(
                "NATS client dropped write messages as a slow consumer (%d so far); "
                "raise STORE_NATS_PENDING_MSGS_LIMIT / STORE_NATS_PENDING_BYTES_LIMIT "
                "or add instances",
                self.stats.dropped_messages,
            )

    def _on_sink_state(self, down: bool) -> None:
        self.feedback.set_sink_down(down)
        if self._intake is not None:
            self._intake.sink_state(down)

    def _on_connection_lost(self) -> None:
        # A service without its connections takes no writes and answers nothing:
        # say so, so the process can end and be restarted.
        if self.status in (Status.STARTING, Status.RUNNING):
            self.connection_lost.set()

    def _on_reconnected(self) -> None:
        if self._intake is not None:
            self._intake.reconnected()
