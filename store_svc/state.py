"""The service's state as its observers see it: the lifecycle status, the counters,
and :class:`ServiceView`, the narrow read-only view that health, readiness, metrics
and the micro service's stats take instead of the service itself.

Everything here is in-memory and read on the event loop (the HTTP probes read a
snapshot built from it), so nothing that reports on the service ever waits on the
database or on NATS.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from store_svc.core import BackpressureLevel, HealthComponent

__all__ = ["ConnectionView", "RedisOutletView", "ServiceView", "Stats", "Status"]


class Status(enum.Enum):
    """Where the service is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class Stats:
    """Plain counters, updated on the event loop only.

    Attributes:
        messages: write messages received.
        received: records received per kind (valid or not).
        accepted: records that passed validation and were queued, per kind.
        committed: records committed to the sink, per kind.
        rejected: records rejected, per reason.
        rejected_by_kind: records rejected, per kind (``unknown`` for unknown kinds).
        dropped_messages: messages the NATS client dropped as a slow consumer.
        dropped_by_kind: the same, per kind named by the subject.
        refused_overload: request-reply writes refused with 503 at the hard watermark.
        dlq_failed: rejected records that could not be published to the DLQ.
        batches: transactions committed.
        sink_errors: failed commit attempts.
        last_sink_error: text of the most recent failed commit, cleared on success.
        last_commit_monotonic: loop time of the last successful commit.
        js_acked: JetStream messages acked after their commit.
        js_naked: JetStream messages handed back for redelivery (stopping).
        js_termed: JetStream messages terminated (nothing usable, or refused by the
            database; on the DLQ).
        js_in_progress: ``in_progress`` signals sent for messages held long.
        js_redelivered: JetStream messages received more than once.
        js_pull_requests: pull requests sent.
        js_pull_resets: pull requests given up as forgotten by the server.
        js_unanswered_since: loop time since which checks of the stream and consumer
            go unanswered (a cluster electing a leader), or ``None``.
        js_unserved_since: loop time since which pull requests find no responder
            (503: the consumer is gone or has no leader yet), or ``None``.
        js_refused: why the server refuses the pull requests (e.g. ``409 Exceeded
            MaxRequestBatch of 10``), or empty.
        queries: read requests answered, per ``<endpoint>:<outcome>`` (``query:ok``,
            ``latest:invalid_range``, ``query:query_timeout`` ...).
        query_records: records sent in query and latest replies.
        retention_removed: rows removed by retention, per kind (hypertables: an
            estimate from the planner's statistics).
        retention_done: retention passes run by this instance.
        retention_skipped: passes another instance of a shared database ran.
        retention_failed: passes that failed (retried at the next interval).
        retention_last_pass: wall time of the last pass that ran or was skipped.
        retention_last_error: text of the last failed pass, cleared by a good one.
    """

    messages: int = 0
    received: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    committed: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_by_kind: Counter[str] = field(default_factory=Counter)
    dropped_messages: int = 0
    dropped_by_kind: Counter[str] = field(default_factory=Counter)
    refused_overload: int = 0
    dlq_failed: int = 0
    batches: int = 0
    sink_errors: int = 0
    last_sink_error: str | None = None
    last_commit_monotonic: float | None = None
    js_acked: int = 0
    js_naked: int = 0
    js_termed: int = 0
    js_in_progress: int = 0
    js_redelivered: int = 0
    js_pull_requests: int = 0
    js_pull_resets: int = 0
    js_unanswered_since: float | None = None
    js_unserved_since: float | None = None
    js_refused: str = ""
    queries: Counter[str] = field(default_factory=Counter)
    query_records: int = 0
    retention_removed: Counter[str] = field(default_factory=Counter)
    retention_done: int = 0
    retention_skipped: int = 0
    retention_failed: int = 0
    retention_last_pass: float | None = None
    retention_last_error: str = ""

    @property
    def committed_total(self) -> int:
        """Records committed, all kinds."""
        return sum(self.committed.values())

    @property
    def rejected_total(self) -> int:
        """Records rejected, all reasons."""
        return sum(self.rejected.values())


class ConnectionView(Protocol):
    """One watched NATS connection, as health and metrics see it."""

    @property
    def role(self) -> str:
        """``ingest`` or ``control``."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        ...

    @property
    def faults(self) -> int:
        """Client tasks that ended under a connected client."""
        ...

    @property
    def disconnects(self) -> int:
        """Connections lost while in use."""
        ...

    @property
    def permission_denials(self) -> int:
        """Publishes and subscriptions the server refused."""
        ...

    def component(self) -> HealthComponent:
        """The connection's health component."""
        ...

    def figures(self) -> dict[str, Any]:
        """The connection's counters for ``$SRV.STATS``."""
        ...


class RedisOutletView(Protocol):
    """What health and metrics read of the Redis feedback outlet."""

    up: bool | None
    published: int
    dropped: int
    failures: int

    @property
    def buffered(self) -> int:
        """Events waiting for Redis."""
        ...

    def component(self) -> HealthComponent:
        """Its health component."""
        ...


class ServiceView(Protocol):
    """What health, readiness, metrics and the micro stats read about the service."""

    @property
    def status(self) -> Status:
        """The lifecycle status."""
        ...

    @property
    def paused(self) -> bool:
        """Whether intake is paused by an admin."""
        ...

    @property
    def warnings(self) -> Sequence[str]:
        """Why health is degraded besides its components (empty when nothing is)."""
        ...

    @property
    def stats(self) -> Stats:
        """The counters."""
        ...

    @property
    def ingest_mode(self) -> str:
        """``core`` or ``jetstream``."""
        ...

    @property
    def sink_name(self) -> str:
        """The sink's short name (``sqlite``, ``postgresql``)."""
        ...

    @property
    def sink_details(self) -> Mapping[str, str]:
        """What the sink shows of itself (its layout, e.g. TimescaleDB hypertables)."""
        ...

    @property
    def sink_progress(self) -> str:
        """What a long sink opening is doing now (empty when nothing is under way)."""
        ...

    @property
    def retention(self) -> Mapping[str, str]:
        """The retention of each kind that has one (``trades`` -> ``90d``)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Records queued."""
        ...

    @property
    def queue_capacity(self) -> int:
        """Queue capacity in records."""
        ...

    @property
    def in_flight(self) -> int:
        """Records taken off the queue and not yet committed."""
        ...

    @property
    def sink_ok(self) -> bool:
        """Whether commits succeed (False while they fail and are retried)."""
        ...

    @property
    def level(self) -> BackpressureLevel:
        """The backpressure level."""
        ...

    @property
    def loop_lag_ms(self) -> float:
        """How late the event loop ran the health refresher last time."""
        ...

    @property
    def connections(self) -> Sequence[ConnectionView]:
        """The ingest and control connections."""
        ...

    @property
    def feedback_redis(self) -> RedisOutletView | None:
        """The feedback outlet onto Core's Redis event bus, when configured."""
        ...

    @property
    def feedback_published(self) -> int:
        """Feedback events published on NATS."""
        ...
