"""The exceptions the service raises, all below one base.

::

    StoreError
    ├── ConfigError            settings that cannot work together
    ├── NatsUnavailable        the NATS server cannot be reached at start-up
    ├── JetStreamUnavailable   JetStream mode, but the server has none or it does not answer
    │   └── JetStreamUnanswered  its JetStream did not answer in time (no leader yet, busy)
    ├── RejectedInput          a payload or record that cannot be stored (has .reason)
    ├── SinkError              the database refused or failed a write (has .retryable)
    │   └── SchemaError        the database holds a schema this version cannot use
    ├── QueueClosed            a put on the queue after shutdown closed it
    ├── ShutdownTimeout        the grace period ran out before everything was flushed
    ├── QueryTimeout           a query ran past STORE_QUERY_TIMEOUT_S (a 504 reply)
    └── BadQuery               a query request that cannot be answered (has .reason)

Callers at the request-reply edge map these to service error codes and reason codes;
nothing else turns an exception into text for a remote peer. A database's own error
text never reaches a publisher or a reader: it is logged, and shown to operators
only, in health (``sink.last_error``) and on the DLQ copy of records it refused.
"""

from __future__ import annotations

__all__ = [
    "BadQuery",
    "ConfigError",
    "JetStreamUnanswered",
    "JetStreamUnavailable",
    "NatsUnavailable",
    "QueryTimeout",
    "QueueClosed",
    "RejectedInput",
    "SchemaError",
    "ShutdownTimeout",
    "SinkError",
    "StoreError",
]


class StoreError(Exception):
    """Base of every error raised by ``store_svc``."""


class ConfigError(StoreError):
    """Settings that cannot work together, found at start-up."""


class NatsUnavailable(StoreError):
    """The NATS server could not be reached at start-up."""


class JetStreamUnavailable(StoreError):
    """JetStream mode, but the server has no JetStream or it does not answer."""


class JetStreamUnanswered(JetStreamUnavailable):
    """The server's JetStream did not answer in time, or said it is not available yet:
    a cluster without a meta leader (an election, too few nodes up) or a busy server.
    Asking again may succeed, unlike a server that has no JetStream at all."""


class RejectedInput(StoreError):
    """Input that cannot be stored.

    Attributes:
        reason: a stable, machine-readable code (``malformed_payload``, ``wrong_type`` ...).
        detail: a human-readable explanation, safe to send to the publisher.
        index: position of the record inside an array payload, if known.
    """

    def __init__(self, reason: str, detail: str, index: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.index = index


class SinkError(StoreError):
    """A write to the database failed.

    Attributes:
        retryable: whether trying the same batch again may succeed.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class SchemaError(SinkError):
    """The database holds a schema this version of the service cannot use."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class QueueClosed(StoreError):
    """``put`` on a queue that no longer takes records (the service is stopping)."""


class ShutdownTimeout(StoreError):
    """The shutdown grace period ran out before everything was committed.

    Attributes:
        pending: records still queued or in flight when time ran out.
    """

    def __init__(self, pending: int) -> None:
        super().__init__(f"shutdown grace period ran out with {pending} records not committed")
        self.pending = pending


class QueryTimeout(StoreError):
    """A query did not finish within ``STORE_QUERY_TIMEOUT_S``; its work was cancelled."""


class BadQuery(StoreError):
    """A query request that cannot be answered as asked (a 400 reply).

    Attributes:
        reason: stable reason code (``invalid_range``, ``bad_cursor`` ...).
        detail: what is wrong, for the requester.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
