"""Constants shared across the service, each with the reason it has its value."""

from __future__ import annotations

#: Name under which the service shows up on the bus (health replies, NATS micro).
SERVICE_NAME = "market-data-store"

#: The record kinds the store accepts; the write subject's fourth token names one.
KINDS: tuple[str, ...] = ("bars", "trades", "quotes", "options")

#: Header that switches a write payload from JSON to MessagePack.
CONTENT_TYPE_HEADER = "Content-Type"
MSGPACK_CONTENT_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})
JSON_CONTENT_TYPES = frozenset({"application/json", "text/json"})

#: Option snapshots carry no time of their own; this header supplies one.
TS_HEADER = "Md-Ts"

#: Headers of DLQ messages: why a record was rejected and where it came from.
REASON_HEADER = "Store-Reject-Reason"
DETAIL_HEADER = "Store-Reject-Detail"
SUBJECT_HEADER = "Store-Original-Subject"
INDEX_HEADER = "Store-Record-Index"
#: On a DLQ message whose original did not fit beside the reject headers: the
#: original's size in bytes (the body is then its first bytes only).
TRUNCATED_HEADER = "Store-Payload-Truncated"

#: ADR-32 service error headers, used on replies to request-reply writes.
SERVICE_ERROR_HEADER = "Nats-Service-Error"
SERVICE_ERROR_CODE_HEADER = "Nats-Service-Error-Code"

#: Header values travel on one line; longer details are cut so a hostile
#: payload cannot make the DLQ message larger than the record it carries.
MAX_HEADER_VALUE_CHARS = 512

#: Rejected records of one message published to the DLQ one by one; the rest are
#: counted only, so a hostile payload of half a million bad records cannot flood it.
MAX_DLQ_PER_MESSAGE = 1000

#: How many per-record errors a write reply lists; the counts stay exact.
MAX_REPLY_ERRORS = 100

#: Epoch numbers above this magnitude are milliseconds, the rule Core's pydantic
#: models apply (2e10 seconds is the year 2603, so no real time is ambiguous).
EPOCH_MS_THRESHOLD = 2e10

#: SQLite and PostgreSQL BIGINT bounds; Core types sizes as unbounded ints.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: Decimal magnitudes within 1e-30 .. 1e30 cover every price, size and greek a market
#: produces; beyond that a value is a unit or encoding bug (and "1e100000" would
#: make a huge row). The number of digits is bounded by the payload size.
MAX_DECIMAL_ADJUSTED_EXPONENT = 30
MAX_DECIMAL_DIGITS = 38

#: Symbols are identifiers, not documents.
MAX_SYMBOL_CHARS = 64

#: Headers that name the schema of telemetry payloads, as the Core ecosystem expects.
SCHEMA_ID_HEADER = "Md-Schema-Id"
SCHEMA_TRACK_HEADER = "Md-Schema-Track"
FEEDBACK_SCHEMA_ID = "telemetry.FeedbackEvent"
SCHEMA_TRACK = "v1"

#: Suggested wait before retrying a write refused as overloaded. Long enough for a
#: batch or two to commit, short enough not to idle a publisher.
OVERLOAD_RETRY_AFTER_MS = 500
RETRY_AFTER_HEADER = "Store-Retry-After-Ms"

#: How long intake, and the NATS client's parser, may run before the event loop gets
#: a turn. A health request takes three or four turns from socket to reply, so a
#: turn must stay short under a flood: with 0.5 ms, health p99 was 20 ms against 25 ms
#: with 1 ms and 16 ms with 0.25 ms, for 4 % and 13 % fewer records stored in the
#: same flood (300,000 writes flat out, benchmarks/bench_overload.py). The parser gets
#: as much time as intake, so the client keeps reading, and counts what it has to drop,
#: rather than leaving the flood in the server (which cuts a slow reader off uncounted).
TURN_SLICE_S = 0.0005

#: Seconds a cancelled task is given to end before it is cancelled again (nats-py
#: swallows some cancellations): long enough for any cleanup it runs on the way out.
CANCEL_PATIENCE_S = 2.0

#: Seconds past ``STORE_SHUTDOWN_GRACE_S`` after which a shutdown that has not ended
#: is taken to be hung: the service logs the stack of every thread and task and exits
#: with :data:`EXIT_HUNG` (an orchestrator would kill it anyway, without saying where).
#: What may still run after the grace period, each step at its own bound, when NATS
#: and the database both stop answering: the two NATS drains (0.1 s, then a 2 s
#: close each), final feedback to Redis (1 s), the readers (1 s each, 2 by default),
#: the control plane (1 s), the SQLite writer's close (10 s) or the PostgreSQL
#: writers' and pool's (5 s each), the metrics server (5 s): about 23 s on defaults,
#: so a stop that is slow but still moving is not cut off.
STOP_OVERRUN_S = 30.0
EXIT_HUNG = 70
