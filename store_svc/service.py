"""The service: wires intake, queue, batcher and sink, and owns the lifecycle.

Start-up order: metrics endpoint → connect NATS → health, readiness and control answer
(``starting``) → open the sink (schema) → the read API answers → announce the
feedback level → start the batcher → start intake. Shutdown runs the other way in a
fixed order, each step bounded by what is left of ``STORE_SHUTDOWN_GRACE_S``: stop intake (messages
already delivered are still handled) → close the queue → the batcher flushes, commits
and replies → publish the final feedback state → the read API stops (queries under
way finish) → drain the NATS connection → close the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from types import TracebackType
from typing import Any, Self

import nats
import pydantic
from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError

from .admin import AdminControl
from .batcher import Batcher
from .control import ControlPlane
from .core import ControlAction, FeedbackPublisher
from .decode import PayloadDecoder
from .errors import ConfigError, NatsUnavailable, ShutdownTimeout
from .feedback import FeedbackLoop, NatsFeedbackPublisher
from .intake import CoreIntake
from .jsintake import JetStreamIntake
from .metrics import Metrics
from .natsclient import OrderedFlushClient
from .query import QueryApi
from .queue import RecordQueue
from .records import KINDS
from .settings import RELOADABLE, Settings, reloaded
from .sinks import Sink, make_sink
from .stats import Stats
from .tasks import cancel_and_wait

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
        self.nc: NATS | None = None
        self._intake: CoreIntake | None = None
        self._batcher_task: asyncio.Task[None] | None = None
        self._feedback_task: asyncio.Task[None] | None = None
        self._rtt_task: asyncio.Task[None] | None = None
        self.metrics = Metrics(self)
        self.batcher.on_commit = self.metrics.observe_commit
        self.batcher.on_sink_state = self._on_sink_state
        self.control = ControlPlane(self)
        self.admin = AdminControl(self, self._act)
        self.query: QueryApi | None = None
        self.paused = False
        self.rtt_ms: float | None = None
        self._stopped = asyncio.Event()
        #: Set when the NATS connection was closed for good while running;
        #: ``store-svc run`` then shuts down and exits with code 1.
        self.connection_lost = asyncio.Event()

    async def start(self) -> None:
        """Connect to NATS, open the sink and start taking writes.

        Raises:
            SinkError: the database cannot be opened.
            NatsUnavailable: NATS cannot be reached within ``STORE_NATS_CONNECT_TIMEOUT_S``.
        """
        self.status = Status.STARTING
        if self.settings.metrics_port is not None:
            try:
                self.metrics.start(self.settings.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on port {self.settings.metrics_port}: {exc}"
                ) from exc
        try:
            self.nc = OrderedFlushClient()
            await self._connect(self.nc)
            # Health answers from here on: while the database opens (a schema check, a
            # locked file, a slow server) a probe sees "starting" rather than nothing.
            await self.control.start(self.nc)
            await self.admin.start(self.nc)
            await self.sink.open()
            await self._start_query(self.nc)
            if self.feedback.publisher is None:
                self.feedback.publisher = NatsFeedbackPublisher(
                    self.nc, self.settings.subject("telemetry", "feedback")
                )
            await self.feedback.announce()
            self._feedback_task = asyncio.create_task(self.feedback.run(), name="feedback")
            self._batcher_task = asyncio.create_task(self.batcher.run(), name="batcher")
            intake_type = (
                JetStreamIntake if self.settings.ingest_mode == "jetstream" else CoreIntake
            )
            self._intake = intake_type(
                self.nc, self.settings, self.decoder, self.queue, self.stats, self.feedback
            )
            await self._intake.start()
            self._rtt_task = asyncio.create_task(self._probe_rtt(), name="rtt")
        except BaseException:
            await self._abort()
            raise
        self.status = Status.RUNNING
        log.info(
            "store-svc running: nats=%s sink=%s queue=%d batch=%d",
            self.nc.connected_url.netloc if self.nc.connected_url else "?",
            self.sink.name,
            self.settings.queue_capacity,
            self.settings.batch_size,
        )

    async def _connect(self, nc: NATS) -> None:
        url = self.settings.nats_url
        limit = self.settings.nats_connect_timeout_s
        try:
            async with asyncio.timeout(limit):
                await nc.connect(
                    servers=self.settings.nats_servers,
                    name=f"store-svc {self.settings.queue_group}",
                    error_cb=self._on_nats_error,
                    closed_cb=self._on_closed,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    # Once connected, never give up: a NATS restart must not end the service.
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes floats
                    connect_timeout=min(5.0, limit),  # type: ignore[arg-type]
                )
        except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
            raise NatsUnavailable(f"cannot reach NATS at {url} within {limit:g}s") from exc

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s
        pending = 0
        try:
            if self._intake is not None:
                log.info("stopping intake")
                await self._intake.stop(max(0.0, deadline - loop.time()) / 2)
            self.queue.close()
            if self._batcher_task is not None:
                log.info("flushing %d queued records", self.queue.depth)
                done, _ = await asyncio.wait(
                    {self._batcher_task}, timeout=max(0.0, deadline - loop.time())
                )
                if not done:
                    pending = self.queue.depth + self.batcher.in_flight
                    await cancel_and_wait(self._batcher_task)
                    log.error("grace period over: %d records were not committed", pending)
            if self._intake is not None:
                await self._intake.close()  # JetStream: hand back what was not committed
            await self._stop_feedback()
            await self._stop_query(deadline - loop.time())
            await self._stop_control()
            if self.nc is not None and not self.nc.is_closed:
                try:
                    async with asyncio.timeout(max(0.1, deadline - loop.time())):
                        await self.nc.drain()
                except (TimeoutError, nats.errors.Error) as exc:
                    log.warning("NATS drain did not finish (%s); closing", exc or "timeout")
                    with contextlib.suppress(OSError, nats.errors.Error):
                        await self.nc.close()  # a lost connection has nothing left to flush
        finally:
            await self.sink.close()
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

    async def _probe_rtt(self) -> None:
        # Health must not wait on the network, so the round-trip time is measured here.
        while True:
            nc = self.nc
            if nc is not None and nc.is_connected:
                try:
                    self.rtt_ms = await nc.rtt(timeout=2) * 1000
                except (TimeoutError, nats.errors.Error):
                    self.rtt_ms = None
            await asyncio.sleep(self.settings.feedback_heartbeat_s)

    async def _act(self, action: ControlAction) -> str:
        """Carry out an authorised control action; return what was done."""
        intake = self._intake
        if self.status is not Status.RUNNING or intake is None:
            raise ValueError(f"the service is {self.status.value}")
        if action is ControlAction.pause:
            if self.paused:
                return "intake was already paused"
            self.paused = True
            await intake.stop(self.settings.shutdown_grace_s / 2)
            return f"intake paused; {self.queue.depth} queued records are still being committed"
        if action is ControlAction.resume:
            if not self.paused:
                return "intake was not paused"
            await intake.start()
            self.paused = False
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
        task, self._rtt_task = self._rtt_task, None
        await cancel_and_wait(task)
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
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
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

    async def _on_nats_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
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
            return
        log.warning("NATS error: %s", exc)

    def _on_sink_state(self, down: bool) -> None:
        self.feedback.set_sink_down(down)
        if self._intake is not None:
            self._intake.sink_state(down)

    async def _on_closed(self) -> None:
        # With reconnects unlimited, nats-py closes the connection on its own only
        # after a protocol error (e.g. a message the server refused as too large).
        # A service without its connection takes no writes and answers nothing:
        # say so, so the process can end and be restarted.
        if self.status is Status.RUNNING:
            nc = self.nc
            log.error(
                "the NATS connection was closed (%s); the service cannot go on",
                nc.last_error if nc is not None else "?",
            )
            self.connection_lost.set()

    async def _on_disconnected(self) -> None:
        if self.status is Status.RUNNING:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        url: Any = self.nc.connected_url if self.nc else None
        log.info("reconnected to NATS at %s", url.netloc if url else "?")
        if self._intake is not None:
            self._intake.reconnected()
