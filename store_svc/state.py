"""Counters the service keeps about itself (read by health, stats, metrics, the demo)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


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
        queries: read requests answered, per ``<endpoint>:<outcome>`` (``query:ok``,
            ``latest:invalid_range``, ``query:query_timeout`` ...).
        query_records: records sent in query and latest replies.
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
    queries: Counter[str] = field(default_factory=Counter)
    query_records: int = 0

    @property
    def committed_total(self) -> int:
        """Records committed, all kinds."""
        return sum(self.committed.values())

    @property
    def rejected_total(self) -> int:
        """Records rejected, all reasons."""
        return sum(self.rejected.values())
