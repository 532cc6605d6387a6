"""One NATS connection of the service, watched so that it can never die silently.

The service holds two (``ingest`` for the write traffic, ``control`` for health,
micro, admin, the read API and telemetry; see ``docs/operations.md``). Each one:

* connects with unlimited reconnects and reports disconnects, reconnects and the
  reason the server gave (an unexpected EOF from a server that is still up is most
  often the server cutting off a slow consumer);
* watches nats-py's own tasks (read loop, flusher, pinger). If one ends while the
  client still counts itself connected, nothing would be read or written again
  until the stale-connection pings notice, minutes later; that is a *fault*: it is
  counted, logged once, and the client is made to reconnect at once. Where it
  cannot reconnect, the connection is reported lost and ``store-svc run`` exits 1
  so a supervisor restarts it;
* counts what the server refuses (a permission missing or revoked): degraded while a
  subscription stays refused (until the next reconnect subscribes again) or a
  publish was refused in the last ``DENIAL_HOLD_S``;
* gives up when the server keeps refusing its reconnects for good reasons
  (credentials revoked or expired, a certificate no longer accepted) for longer than
  ``STORE_NATS_CONNECT_TIMEOUT_S``: retrying would only hide it;
* measures its round-trip time with a high-resolution clock (nats-py's ``rtt()``
  uses the loop clock, whose resolution under uvloop is a millisecond);
* reports all of it as one Core ``HealthComponent`` and as ``$SRV.STATS`` figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import nats
from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError, UnexpectedEOF

from store_svc.bus.auth import (
    connect_failure,
    connect_options,
    permission_refusal,
    redact_url,
)
from store_svc.bus.client import OrderedFlushClient, close_client, server_info
from store_svc.core import HealthComponent
from store_svc.errors import NatsUnavailable
from store_svc.settings import Settings
from store_svc.tasks import cancel_and_wait, reraise_swallowed_cancel

__all__ = ["NatsConnection"]

log = logging.getLogger(__name__)

#: nats-py's background tasks, by the attribute that holds each one.
_WATCHED = (
    ("read loop", "_reading_task"),
    ("flusher", "_flusher_task"),
    ("pinger", "_ping_interval_task"),
)

#: How long an RTT probe may wait for its PONG before the RTT reads "unknown".
RTT_TIMEOUT_S = 2.0

#: An error seen this shortly before a disconnect is taken as its reason.
_REASON_WINDOW_S = 2.0


#: A refused publish keeps the connection degraded this long (the next refusal renews it).
DENIAL_HOLD_S = 60.0

#: Subject tokens that differ per message (sequence numbers, inbox ids): a refusal of
#: ``$JS.ACK.S.c.1.42.42...`` or ``_INBOX.<id>`` is one refusal, however many follow.
_VARYING = re.compile(r"(?<=\.)(?:\d+|[A-Za-z0-9]{16,})(?=\.|\"|$)")

#: Distinct refused subjects remembered (so each is logged once); more are counted only.
_MAX_DENIED_SUBJECTS = 256


class NatsConnection:
    """A watched nats-py connection with its own counters.

    Args:
        role: ``ingest`` or ``control``; part of the client name, the log lines and
            the health component (``nats-<role>``).
        settings: URLs, timeouts, queue group and the RTT probe interval.
        on_lost: called once when the connection is gone for good while in use.
        on_reconnected: called after every reconnect.
        on_slow_consumer: called for each message the client drops as a slow
            consumer (the write subscription's drops are counted by the service).
    """

    def __init__(
        self,
        role: str,
        settings: Settings,
        *,
        on_lost: Callable[[], None] | None = None,
        on_reconnected: Callable[[], None] | None = None,
        on_slow_consumer: Callable[[SlowConsumerError], None] | None = None,
    ) -> None:
        self.role = role
        self.nc: NATS = OrderedFlushClient()
        self.rtt_ms: float | None = None
        #: Times a nats-py task ended under a connected client (each one reconnected).
        self.faults = 0
        self.last_fault = ""
        #: Connections lost while in use (each followed by reconnect attempts).
        self.disconnects = 0
        self.last_disconnect = ""
        #: Disconnects where the server closed the socket without a word: a server
        #: that cut this client off as a slow consumer, or one going away.
        self.server_closed = 0
        #: Messages the client dropped as a slow consumer on this connection.
        self.slow_consumer_drops = 0
        #: Publishes and subscriptions the server refused (``Permissions Violation``);
        #: each distinct refusal is logged once.
        self.permission_denials = 0
        self.last_permission_denied = ""
        self._denied: set[str] = set()
        self._denied_full = False
        #: Subscriptions refused since the last (re)connect; publish refusal's time.
        self._refused_subscriptions: set[str] = set()
        self._publish_refused_at: float | None = None
        #: When the server began refusing this connection's reconnects for good reasons.
        self._reconnect_refused_since: float | None = None
        self._give_up: asyncio.Task[None] | None = None
        self._settings = settings
        self._on_lost = on_lost
        self._on_reconnected = on_reconnected
        self._on_slow_consumer = on_slow_consumer
        self._in_use = False
        self._tried = False
        #: (monotonic time, text, whether it says the server closed the socket)
        self._last_error: tuple[float, str, bool] | None = None
        self._last_warned = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        #: While connecting: resolved with the cause when the server refuses us for good.
        self._refused: asyncio.Future[str] | None = None
        self._connect_cause = ""

    @property
    def refusals(self) -> frozenset[str]:
        """The distinct refusals seen so far (the first 256), as the server worded them
        (nats-py hands them over in lower case), per-message tokens as ``*``."""
        return frozenset(self._denied)

    @property
    def connected(self) -> bool:
        """Whether the client is connected (draining counts as connected)."""
        return bool(self.nc.is_connected)

    async def connect(self) -> None:
        """Connect, then start watching the client and probing its round trip.

        Raises:
            NatsUnavailable: NATS cannot be reached within ``STORE_NATS_CONNECT_TIMEOUT_S``.
        """
        settings = self._settings
        limit = settings.nats_connect_timeout_s
        where = ", ".join(redact_url(u) for u in settings.nats_servers)
        try:
            options = connect_options(settings)
        except (OSError, ssl.SSLError) as exc:
            raise NatsUnavailable(f"cannot use the NATS TLS files: {exc}") from None
        self._tried = True
        loop = asyncio.get_running_loop()
        self._refused = loop.create_future()
        connecting = asyncio.ensure_future(
            self.nc.connect(
                servers=settings.nats_servers,
                name=f"store-svc {settings.queue_group} {self.role}",
                error_cb=self._on_error,
                closed_cb=self._on_closed,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnect,
                # Once connected, never give up: a NATS restart must not end the service.
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py takes floats
                ping_interval=settings.nats_ping_interval_s,  # type: ignore[arg-type]
                max_outstanding_pings=settings.nats_max_outstanding_pings,
                connect_timeout=min(5.0, limit),  # type: ignore[arg-type]
                **options,
            )
        )
        try:
            waits: set[asyncio.Future[Any]] = {connecting, self._refused}
            await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (a signal during start-up): nats-py's connect would go on
            # trying servers for ever under a client that is closed.
            await cancel_and_wait(connecting)
            raise
        finally:
            refused, self._refused = self._refused, None
        if refused.done():
            # Credentials or a certificate the server refuses: retrying cannot help.
            await cancel_and_wait(connecting)
            raise NatsUnavailable(f"cannot connect to NATS at {where}: {refused.result()}")
        if not connecting.done():
            await cancel_and_wait(connecting)
            cause = self._connect_cause or "timed out"
            raise NatsUnavailable(f"cannot reach NATS at {where} within {limit:g}s: {cause}")
        failed = connecting.exception()
        if failed is not None:
            cause, _ = connect_failure(failed)
            raise NatsUnavailable(f"cannot connect to NATS at {where}: {cause}") from None
        self._in_use = True
        self._watch()
        self._spawn(self._probe_rtt(), "rtt")

    async def drain(self, timeout: float) -> None:
        """Drain (subscriptions, then what is still to send) and close; idempotent.

        Args:
            timeout: seconds the drain may take before the client is closed instead.
        """
        self._in_use = False
        await self._stop_tasks()
        nc = self.nc
        if nc.is_closed or not nc.is_connected:
            await self.close()
            return
        # Not under asyncio.timeout: nats-py's drain catches the cancellation of a
        # timeout and goes on to a flush of its own (10 s) and a close.
        timeout = max(0.1, timeout)
        draining = asyncio.ensure_future(nc.drain())
        done, _ = await asyncio.wait({draining}, timeout=timeout)
        if done:
            exc = draining.exception()
            if exc is None:
                return
            if not isinstance(exc, (TimeoutError, nats.errors.Error)):
                raise exc
            log.warning("NATS %s drain did not finish (%s); closing", self.role, exc)
        else:
            log.warning("NATS %s drain did not finish within %.1fs; closing", self.role, timeout)
            draining.cancel()  # taken by the drain, which goes on to flush...
            await asyncio.sleep(0)
            draining.cancel()  # ...which this ends
            await cancel_and_wait(draining)
        await self.close()

    async def close(self) -> None:
        """Close at once, without draining; idempotent."""
        self._in_use = False
        await self._stop_tasks()
        # nats-py cannot close a client that never began to connect.
        if self._tried and not self.nc.is_closed:
            await close_client(self.nc)

    def component(self) -> HealthComponent:
        """This connection as a Core ``HealthComponent`` named ``nats-<role>``."""
        nc = self.nc
        connected = self.connected
        info = server_info(nc)
        state = "healthy" if connected else "unhealthy"
        if connected and self._refusing():
            state = "degraded"  # up, but something it must publish or receive is refused
        return HealthComponent(
            name=f"nats-{self.role}",
            state=state,
            details={
                "connected": str(connected).lower(),
                "server": redact_url(nc.connected_url.geturl()).split("//", 1)[-1]
                if nc.connected_url
                else "",
                # Which node of a cluster, and how many the client knows of (seeds
                # and the servers the cluster told it about).
                "server_name": str(info.get("server_name", "")) if connected else "",
                "cluster": str(info.get("cluster", "")) if connected else "",
                "known_servers": str(len(nc.servers)),
                "reconnects": str(nc.stats.get("reconnects", 0)),
                "disconnects": str(self.disconnects),
                "server_closed": str(self.server_closed),
                "faults": str(self.faults),
                "slow_consumer_drops": str(self.slow_consumer_drops),
                "permission_denials": str(self.permission_denials),
                "last_permission_denied": self.last_permission_denied,
                "last_fault": self.last_fault,
                "last_disconnect": self.last_disconnect,
                "rtt_ms": f"{self.rtt_ms:.3f}" if self.rtt_ms is not None else "unknown",
            },
        )

    def _refusing(self) -> bool:
        """Whether something this connection must publish or receive is refused now."""
        at = self._publish_refused_at
        recent = at is not None and time.monotonic() - at < DENIAL_HOLD_S
        return recent or bool(self._refused_subscriptions)

    def figures(self) -> dict[str, Any]:
        """Counters for ``$SRV.STATS`` and the metrics."""
        return {
            "connected": self.connected,
            "reconnects": int(self.nc.stats.get("reconnects", 0)),
            "disconnects": self.disconnects,
            "server_closed": self.server_closed,
            "faults": self.faults,
            "slow_consumer_drops": self.slow_consumer_drops,
            "permission_denials": self.permission_denials,
            "rtt_ms": self.rtt_ms,
        }

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"nats-{self.role}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_tasks(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                await cancel_and_wait(task)

    def _watch(self) -> None:
        for what, attr in _WATCHED:
            task = getattr(self.nc, attr, None)
            if isinstance(task, asyncio.Task):
                task.add_done_callback(functools.partial(self._task_ended, what, attr))

    def _task_ended(self, what: str, attr: str, task: asyncio.Task[Any]) -> None:
        nc = self.nc
        # A task replaced by a reconnect, or ended by close, drain or reconnect (each
        # leaves the CONNECTED state first), or of a connection being closed, is no fault.
        if (
            not self._in_use
            or getattr(nc, attr, None) is not task
            or not nc.is_connected
            or nc.is_draining
        ):
            return
        cause = ""
        if not task.cancelled() and task.exception() is not None:
            cause = f": {task.exception()!r}"
        elif self._last_error is not None:
            cause = f" after {self._last_error[1]}"
        self.faults += 1
        self.last_fault = f"nats-py {what} ended under a connected client{cause}"[:200]
        log.error(
            "NATS %s connection fault #%d: %s; reconnecting",
            self.role,
            self.faults,
            self.last_fault,
        )
        self._spawn(self._recover(), "recover")

    async def _recover(self) -> None:
        nc = self.nc
        if not self._in_use or nc.is_draining:
            return  # closing or draining meanwhile: a reconnect would undo that
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.force_reconnect()
        if nc.is_reconnecting or nc.is_closed:
            return
        # nats-py would not reconnect (reconnects disabled, or a state it refuses):
        # a connection that reads nothing must not pass for a live one.
        log.error("NATS %s connection could not be re-established; giving up", self.role)
        await self.close()
        self._lost()

    async def _probe_rtt(self) -> None:
        # Health must not wait on the network, so the round trip is measured here.
        every = self._settings.feedback_heartbeat_s
        while True:
            nc = self.nc
            if nc.is_connected and not nc.is_draining:
                started = time.perf_counter()
                try:
                    await nc.flush(timeout=RTT_TIMEOUT_S)  # type: ignore[arg-type]
                except (TimeoutError, nats.errors.Error):
                    self.rtt_ms = None
                else:
                    self.rtt_ms = (time.perf_counter() - started) * 1000
                # A stop that cancels this task as its PONG comes in is swallowed by
                # the flush: without this the probe went on, and the stop with it.
                reraise_swallowed_cancel()
            await asyncio.sleep(every)

    def _lost(self) -> None:
        if self._on_lost is not None:
            self._on_lost()

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self.slow_consumer_drops += 1
            if self._on_slow_consumer is not None:
                self._on_slow_consumer(exc)
            elif self.slow_consumer_drops == 1 or self.slow_consumer_drops % 1000 == 0:
                log.warning(
                    "NATS %s connection dropped messages on %s as a slow consumer (%d so far)",
                    self.role,
                    exc.subject,
                    self.slow_consumer_drops,
                )
            return
        refused = self._refused
        if refused is not None:  # still connecting: name the cause, give up if final
            cause, final = connect_failure(exc)
            self._connect_cause = cause
            # With several seed URLs another server may yet take us: wait for it.
            if final and not refused.done() and len(self._settings.nats_servers) == 1:
                refused.set_result(cause)
            log.debug("NATS %s: connecting: %s", self.role, cause)
            return
        text = str(exc) or type(exc).__name__
        refusal = permission_refusal(text)
        if refusal is not None:
            self._permission_denied(refusal)
            return
        if self.nc.is_reconnecting or self.nc.is_connecting:  # (nats-py: connecting)
            cause, final = connect_failure(exc)
            if final:
                self._reconnect_refused(cause)
                return
            self._refusals_ended()  # a network fault: the server did not refuse us
        hung_up = isinstance(exc, UnexpectedEOF | ConnectionResetError | BrokenPipeError)
        now = time.monotonic()
        last = self._last_error
        self._last_error = (now, text, hung_up)
        # Every failed reconnect reports here, twice a second during an outage: a text
        # already logged in the last minute is not logged again.
        if last is None or last[1] != text or now - self._last_warned >= 60.0:
            self._last_warned = now
            log.warning("NATS %s: %s", self.role, text)

    def _permission_denied(self, text: str) -> None:
        """The server refused a publish or subscribe (a permission missing or revoked)."""
        self.permission_denials += 1
        what = (permission_refusal(text) or text)[:200]
        self.last_permission_denied = what
        if "for subscription" in what:
            self._refused_subscriptions.add(what)
        else:
            self._publish_refused_at = time.monotonic()
        key = _VARYING.sub("*", what)
        if key in self._denied or self._denied_full:
            return
        if len(self._denied) == _MAX_DENIED_SUBJECTS:
            self._denied_full = True
            log.error(
                "NATS %s: %d distinct refusals logged; further ones are only counted",
                self.role,
                _MAX_DENIED_SUBJECTS,
            )
            return
        self._denied.add(key)
        log.error(
            "NATS %s: the server refused a subject: %s (check this user's permissions; "
            "docs/operations.md lists what the store needs)",
            self.role,
            what,
        )

    def _reconnect_refused(self, cause: str) -> None:
        """A reconnect the server refused for a reason retrying cannot mend."""
        self.last_disconnect = cause[:200]
        if self._reconnect_refused_since is not None:
            return
        self._reconnect_refused_since = time.monotonic()
        limit = self._settings.nats_connect_timeout_s
        log.error(
            "NATS %s: reconnecting was refused: %s; giving up in %gs unless it is accepted",
            self.role,
            cause,
            limit,
        )
        self._give_up = asyncio.create_task(
            self._give_up_if_still_refused(limit, cause), name=f"nats-{self.role}-refused"
        )
        self._tasks.add(self._give_up)
        self._give_up.add_done_callback(self._tasks.discard)

    def _refusals_ended(self) -> None:
        """Accepted again, or failing for a reason that is not a refusal (the server
        is down or unreachable: reconnecting goes on for as long as it takes)."""
        self._reconnect_refused_since = None
        task, self._give_up = self._give_up, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _give_up_if_still_refused(self, after: float, cause: str) -> None:
        await asyncio.sleep(after)
        if self._give_up is not asyncio.current_task() or not self._in_use:
            return  # accepted again meanwhile (or another kind of failure), or closing
        log.error(
            "NATS %s connection: the server refused every reconnect for %gs (%s); the "
            "service cannot go on",
            self.role,
            after,
            cause,
        )
        await self.close()
        self._lost()

    async def _on_disconnected(self) -> None:
        if not self._in_use:
            return
        self.disconnects += 1
        recent = self._last_error
        hung_up = False
        if recent is not None and time.monotonic() - recent[0] < _REASON_WINDOW_S:
            self.last_disconnect = recent[1][:200]
            hung_up = recent[2]
        else:
            self.last_disconnect = "unknown"
        if hung_up:
            self.server_closed += 1
            log.warning(
                "the server closed the NATS %s connection without a reason; if it is still "
                "up, it most likely cut this client off as a slow consumer (what it held "
                "for this client is lost: see the server's log and slow_consumers) or no "
                "longer accepts its credentials; reconnecting",
                self.role,
            )
        else:
            log.warning(
                "disconnected from NATS (%s connection: %s); reconnecting",
                self.role,
                self.last_disconnect,
            )

    async def _on_reconnect(self) -> None:
        self._refusals_ended()
        self._refused_subscriptions.clear()  # subscribed again: refused ones say so anew
        self._watch()
        log.info(
            "NATS %s connection re-established at %s",
            self.role,
            redact_url(self.nc.connected_url.netloc) if self.nc.connected_url else "?",
        )
        if self._on_reconnected is not None:
            self._on_reconnected()

    async def _on_closed(self) -> None:
        # With reconnects unlimited, nats-py closes the connection on its own only
        # after a protocol error (e.g. a message the server refused as too large).
        if self._in_use:
            self._in_use = False
            log.error(
                "the NATS %s connection was closed (%s); the service cannot go on",
                self.role,
                self.nc.last_error,
            )
            self._lost()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
