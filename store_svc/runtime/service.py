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
import json
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import nats
import pydantic
from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError

from store_svc.bus.auth import redact_url
from store_svc.bus.connection import NatsConnection
from store_svc.control.admin import AdminControl, NotRunning
from store_svc.control.feedback import FeedbackLoop, NatsFeedbackPublisher
from store_svc.control.health import readiness
from store_svc.control.metrics import Metrics
from store_svc.control.micro import ControlPlane
from store_svc.control.probes import HealthSnapshot
from store_svc.control.redis_feedback import RedisFeedbackPublisher
from store_svc.core import BackpressureLevel, ControlAction, FeedbackPublisher
from store_svc.errors import (
    ConfigError,
    JetStreamUnanswered,
    JetStreamUnavailable,
    ShutdownTimeout,
    StoreError,
)
from store_svc.ingest.batcher import Batcher
from store_svc.ingest.decode import PayloadDecoder
from store_svc.ingest.edge import Intake, IntakeParts
from store_svc.ingest.intake import CoreIntake
from store_svc.ingest.jetstream import JetStreamIntake
from store_svc.ingest.queue import RecordQueue
from store_svc.kinds import kind_or_unknown
from store_svc.read.api import QueryApi
from store_svc.runtime.retention import RetentionRunner
from store_svc.settings import RELOADABLE, Settings, reloaded
from store_svc.state import ConnectionView, Stats, Status
from store_svc.store.base import Sink
from store_svc.store.factory import make_sink
from store_svc.tasks import TaskSet, reraise_swallowed_cancel

__all__ = ["Status", "StoreService"]

log = logging.getLogger(__name__)

#: How long shutdown waits for the last feedback events to reach Redis.
REDIS_FLUSH_S = 1.0
#: The pause before asking JetStream again at start-up when it did not answer, and
#: the most each request of that set-up may take.
START_ASK_AGAIN_S = 0.5
START_REQUEST_TIMEOUT_S = 5.0
#: The most each request of JetStream's set-up may take on an admin resume.
RESUME_REQUEST_TIMEOUT_S = 1.0


def _first_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError):
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


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
        self.status = Status.CREATED
        self.paused = False
        #: Why health is degraded besides its components (e.g. a stream that captures
        #: the write subjects in core mode); empty when nothing is wrong.
        self.warnings: list[str] = []
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
        self.feedback = FeedbackLoop(settings, settings.queue_capacity, feedback_publisher)
        #: Feedback also onto Core's Redis event bus (``STORE_FEEDBACK_REDIS_URL``).
        self.redis_feedback: RedisFeedbackPublisher | None = None
        if settings.feedback_redis_url is not None:
            self.redis_feedback = RedisFeedbackPublisher(
                settings.feedback_redis_url.get_secret_value(),
                settings.feedback_redis_namespace,
                settings.feedback_redis_maxlen,
            )
        self.queue = RecordQueue(settings.queue_capacity, on_depth=self.feedback.on_depth)
        #: What health, readiness, metrics and the micro stats read (never the service).
        self.view = _View(self)
        self.snapshot = HealthSnapshot(settings.loop_stall_s, lambda: readiness(self.view))
        self.metrics = Metrics(self.view, self.snapshot)
        self.batcher = Batcher(
            self.queue,
            self.sink,
            self.stats,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval_ms / 1000,
            retry_initial=settings.sink_retry_initial_s,
            retry_max=settings.sink_retry_max_s,
            on_commit=self.metrics.observe_commit,
            on_sink_state=self._on_sink_state,
        )
        self.decoder = PayloadDecoder(
            settings.max_payload_bytes, settings.max_future_skew_s, settings.retentions
        )
        self.control = ControlPlane(settings, self.view)
        self.admin = AdminControl(settings, self._act)
        self.query: QueryApi | None = None
        self._intake: Intake | None = None
        self.retention = RetentionRunner(self.sink, settings, self.stats)
        #: The snapshot refresher, the feedback publisher and the batcher.
        self._tasks = TaskSet("service")
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
            ConfigError: the metrics port cannot be bound.
            RuntimeError: ``start`` was called before (a service starts once).
        """
        if self.status is not Status.CREATED:
            raise RuntimeError(f"start() was called before (the service is {self.status.value})")
        self.status = Status.STARTING
        self._tasks.start("snapshot", self.snapshot.keep_fresh())
        if self.settings.metrics_port is not None:
            try:
                self.metrics.start(self.settings.metrics_port)
            except OSError as exc:
                await self._tasks.close()
                self.status = Status.STOPPED
                self._stopped.set()
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
            if self.redis_feedback is not None:
                self.feedback.outlets.append(self.redis_feedback)
                self._tasks.start("feedback-redis", self.redis_feedback.run())
            await self.feedback.announce()
            self._tasks.start("feedback", self.feedback.run())
            self._tasks.start("batcher", self.batcher.run())
            parts = IntakeParts(
                self.nc, self.settings, self.decoder, self.queue, self.stats, self.feedback
            )
            if self.settings.ingest_mode == "jetstream":
                self._intake = JetStreamIntake(parts)
            else:
                await self._check_no_stream_captures_writes()
                self._intake = CoreIntake(parts)
            await self._start_intake(self._intake)
            if self.retention.configured:
                self._tasks.start("retention", self.retention.run())
        except BaseException:
            await self._abort()
            raise
        self.status = Status.RUNNING
        self.snapshot.refresh()
        log.info(
            "store-svc running: nats=%s sink=%s queue=%d batch=%d",
            redact_url(self.nc.connected_url.geturl()) if self.nc.connected_url else "?",
            self.sink.name,
            self.settings.queue_capacity,
            self.settings.batch_size,
        )

    async def _start_intake(self, intake: Intake) -> None:
        """Start ``intake``.

        JetStream that does not answer yet is asked again until
        ``STORE_NATS_CONNECT_TIMEOUT_S`` has passed (each request cut to fit): a
        cluster electing its leader, or another instance creating the same R3 stream
        at the same moment, can leave a request unanswered for seconds. A JetStream API
        request the server refused is named as such (it would otherwise read as a
        server without JetStream).
        """
        denied = self.ingest_nats.permission_denials
        loop = asyncio.get_running_loop()
        budget = self.settings.nats_connect_timeout_s
        began = loop.time()
        deadline = began + budget
        asked_again = False
        while True:
            reraise_swallowed_cancel()  # a request of the set-up can swallow it
            left = deadline - loop.time()
            try:
                await intake.start(min(START_REQUEST_TIMEOUT_S, max(1.0, left)))
            except JetStreamUnavailable as exc:
                if self.ingest_nats.permission_denials != denied:
                    refused = self.ingest_nats.last_permission_denied
                    raise JetStreamUnavailable(
                        f"the NATS server refused the store's JetStream set-up ({refused}): "
                        "its user lacks a permission listed in docs/operations.md, Least "
                        "privilege"
                    ) from exc
                if not isinstance(exc, JetStreamUnanswered):
                    raise
                left = deadline - loop.time()
                if left <= 0:
                    raise JetStreamUnanswered(
                        f"{exc}; gave up after {loop.time() - began:.1f} s "
                        f"(STORE_NATS_CONNECT_TIMEOUT_S={budget:g})"
                    ) from exc
                if not asked_again:
                    asked_again = True
                    log.warning(
                        "%s; asking again for up to %.0f s (STORE_NATS_CONNECT_TIMEOUT_S)",
                        exc,
                        left,
                    )
                await asyncio.sleep(min(START_ASK_AGAIN_S, left))
            else:
                if asked_again:
                    log.info("JetStream answers after %.1f s", loop.time() - began)
                return

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
        self.snapshot.refresh()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s
        pending = 0

        def left() -> float:
            return max(0.0, deadline - loop.time())

        try:
            await self._tasks.stop("retention")  # no deletes while draining
            if self._intake is not None:
                log.info("stopping intake")
                await self._intake.stop(left() / 2)
            self.queue.close()
            batcher = self._tasks.get("batcher")
            if batcher is not None:
                log.info("flushing %d queued records", self.queue.depth)
                done, _ = await asyncio.wait({batcher}, timeout=left())
                if not done:
                    pending = self.queue.depth + self.batcher.in_flight
                    await self._tasks.stop("batcher")
                    log.error("grace period over: %d records were not committed", pending)
            if self._intake is not None:
                await self._intake.close()  # JetStream: hand back what was not committed
            await self.ingest_nats.drain(left())
            await self._stop_feedback()
            await self._stop_query(left())
            await self._stop_control(max(1.0, left()))
            await self.control_nats.drain(left())
        finally:
            await self.ingest_nats.close()
            await self.control_nats.close()
            await self.sink.close()
            await self._tasks.close()
            if self.redis_feedback is not None:
                await self.redis_feedback.close()
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
            self.snapshot.refresh()
            await intake.stop(self.settings.shutdown_grace_s / 2)
            return f"intake paused; {self.queue.depth} queued records are still being committed"
        if action is ControlAction.resume:
            if not self.paused:
                return "intake was not paused"
            try:
                # Short requests: the answer must reach an operator's `store-svc
                # control` (5 s by default) before it gives up.
                await intake.start(RESUME_REQUEST_TIMEOUT_S)
            except StoreError as exc:  # JetStream not answering, or refusing the set-up
                raise NotRunning("paused", f"intake is still paused: {exc}") from exc
            self.paused = False
            self.snapshot.refresh()
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

    async def _stop_control(self, timeout: float = 5.0) -> None:
        # Bounded: the micro service drains its subscriptions, which waits on the
        # server; closing the connection afterwards ends them anyway.
        try:
            async with asyncio.timeout(timeout):
                with contextlib.suppress(nats.errors.Error):
                    await self.admin.stop()
                with contextlib.suppress(nats.errors.Error):
                    await self.control.stop()
        except TimeoutError:
            log.warning("stopping the control plane took over %.1fs; closing instead", timeout)

    async def _stop_feedback(self) -> None:
        if self._tasks.get("feedback") is None:
            return
        await self._tasks.stop("feedback")
        self.feedback.close()
        self.feedback.settle()
        await self.feedback.announce()  # the final state, before the connection drains
        await self._stop_redis_feedback()

    async def _stop_redis_feedback(self) -> None:
        redis_feedback = self.redis_feedback
        if redis_feedback is None or self._tasks.get("feedback-redis") is None:
            return
        if not await redis_feedback.flush(REDIS_FLUSH_S):
            log.warning(
                "%d feedback events did not reach Redis before shutdown", redis_feedback.buffered
            )
        await self._tasks.stop("feedback-redis")  # its client is closed at the end of stop()

    async def _start_query(self, nc: NATS) -> None:
        if not self.settings.query_enabled:
            return
        reader = self.sink.reader(self.settings.query_concurrency)
        if reader is None:
            log.info("the %s sink cannot be queried; no read API", self.sink.name)
            return
        self.query = QueryApi(
            lambda: self.settings, reader, self.stats, on_answered=self.metrics.observe_query
        )
        await self.query.start(nc)

    async def _stop_query(self, timeout: float) -> None:
        query, self.query = self.query, None
        if query is not None:
            await query.stop(min(self.settings.query_timeout_s, max(0.0, timeout)))

    async def _abort(self) -> None:
        await self._stop_query(0.0)
        await self._stop_control()
        self.queue.close()
        await self._tasks.close()
        self.feedback.close()
        if self.redis_feedback is not None:
            await self.redis_feedback.close()
        if self._intake is not None:
            await self._intake.close()
        await self.ingest_nats.close()
        await self.control_nats.close()
        await self.sink.close()
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
        self.stats.dropped_by_kind[kind_or_unknown(tail.partition(".")[0])] += 1
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


class _View:
    """The service as :class:`~store_svc.state.ServiceView`: read-only, in-memory."""

    __slots__ = ("_svc",)

    def __init__(self, svc: StoreService) -> None:
        self._svc = svc

    @property
    def status(self) -> Status:
        return self._svc.status

    @property
    def paused(self) -> bool:
        return self._svc.paused

    @property
    def warnings(self) -> Sequence[str]:
        return self._svc.warnings

    @property
    def stats(self) -> Stats:
        return self._svc.stats

    @property
    def ingest_mode(self) -> str:
        return self._svc.settings.ingest_mode

    @property
    def sink_name(self) -> str:
        return self._svc.sink.name

    @property
    def sink_details(self) -> Mapping[str, str]:
        return self._svc.sink.details()

    @property
    def sink_progress(self) -> str:
        return self._svc.sink.progress

    @property
    def retention(self) -> Mapping[str, str]:
        return self._svc.retention.describe()

    @property
    def queue_depth(self) -> int:
        return self._svc.queue.depth

    @property
    def queue_capacity(self) -> int:
        return self._svc.queue.capacity

    @property
    def in_flight(self) -> int:
        return self._svc.batcher.in_flight

    @property
    def sink_ok(self) -> bool:
        return self._svc.batcher.sink_ok

    @property
    def level(self) -> BackpressureLevel:
        return self._svc.feedback.level

    @property
    def loop_lag_ms(self) -> float:
        return self._svc.snapshot.lag_ms

    @property
    def connections(self) -> Sequence[ConnectionView]:
        return (self._svc.ingest_nats, self._svc.control_nats)

    @property
    def feedback_redis(self) -> RedisFeedbackPublisher | None:
        return self._svc.redis_feedback

    @property
    def feedback_published(self) -> int:
        return self._svc.feedback.published
