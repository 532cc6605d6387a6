"""Feedback on Core's event bus: every ``FeedbackEvent`` also goes to a Redis stream.

The wider platform's pipelines listen for feedback with Core's own bus
(``market_data_core.events.create_event_bus(backend="redis")``), subscribed to the
logical stream ``telemetry.feedback`` with a consumer group (``pipeline``). That bus
keeps each event as one stream entry under the key ``<namespace>:telemetry.feedback``
(namespace ``mdp`` by default), with a single field ``data``: Core's ``JsonCodec``
envelope (``ts``, ``key``, ``meta`` with ``schema_id`` and ``track``, ``payload``).
:class:`RedisFeedbackPublisher` writes exactly that, with Core's codec.

Where Core's bus falls short, and what is done about it here:

* Its ``publish`` derives the schema id from the model's module
  (``telemetry.backpressure.FeedbackEvent``), which its own ``subscribe`` cannot
  resolve (it knows ``telemetry.FeedbackEvent``): a consumer would move every such
  event to its DLQ. The store names the schema id itself.
* Its ``ack`` does nothing, so entries stay pending in the consumer group. The store
  caps the stream (``XADD MAXLEN ~``) so Redis never fills with feedback; the
  pending list of a group that never acks is the consumer's to trim (see
  docs/operations.md).
* Its group is created at ``$``: a consumer hears only what is published after its
  group first exists. Heartbeats repeat the current level, so it learns the state
  within one heartbeat.

Publishing never blocks the feedback loop: the loop offers each event as it is made
(:meth:`RedisFeedbackPublisher.offer`; ``publish`` is Core's protocol for the same)
to a bounded buffer (oldest dropped first, counted), and a task of its own writes
it, so Redis hears every event even while NATS is away. Redis down or frozen makes
the ``feedback-redis`` health component degraded and logs once per outage; the task
reconnects by itself.

Delivery is at least once: a write that times out (Redis frozen or slow) may still
have reached Redis, and is written again. Feedback is a state (each event carries its
``ts``; the newest wins), so a repeated event is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from store_svc.constants import FEEDBACK_SCHEMA_ID, SCHEMA_TRACK
from store_svc.core import FeedbackEvent, HealthComponent
from store_svc.tasks import reraise_swallowed_cancel

__all__ = ["RedisFeedbackPublisher", "redis_stream_key"]

log = logging.getLogger(__name__)

#: Events kept while Redis is away or slow (oldest dropped first). Feedback is a
#: state: after an outage the newest events say all that matters.
BUFFER_EVENTS = 256
#: How long one Redis command may take before Redis counts as unreachable.
COMMAND_TIMEOUT_S = 2.0
#: Back-off between attempts while Redis is unreachable.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
#: The logical stream Core's pipelines subscribe to.
FEEDBACK_STREAM = "telemetry.feedback"


def redis_stream_key(namespace: str) -> str:
    """The Redis key of the feedback stream, as Core's bus names it."""
    return f"{namespace}:{FEEDBACK_STREAM}"


def _safe_url(url: str) -> str:
    """``url`` without its credentials (for health and logs)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


class RedisFeedbackPublisher:
    """Core's ``FeedbackPublisher`` protocol onto Core's Redis event bus.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL of the server.
        namespace: the key prefix Core's bus uses (its ``MD_NAMESPACE``, ``mdp``).
        maxlen: the stream is trimmed to about this many entries.
        timeout_s: longest one command may take.
    """

    def __init__(
        self, url: str, namespace: str, maxlen: int, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> None:
        # Imported here: the redis package is only needed when this is configured.
        import redis.asyncio
        from market_data_core.events import JsonCodec

        self.url = _safe_url(url)
        self.key = redis_stream_key(namespace)
        self.maxlen = maxlen
        self._codec = JsonCodec(track=SCHEMA_TRACK)
        self._redis: Any = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._buffer: deque[FeedbackEvent] = deque(maxlen=BUFFER_EVENTS)
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        #: None until the first write was tried; then whether the last one succeeded.
        self._writing: FeedbackEvent | None = None
        self._writing_evicted = False
        self._closed = False
        self.up: bool | None = None
        self.published = 0
        self.dropped = 0
        self.failures = 0
        self.last_error = ""

    def offer(self, event: FeedbackEvent) -> None:
        """Buffer ``event`` for Redis (never blocks, never raises).

        Args:
            event: the feedback event.
        """
        buffer = self._buffer
        if len(buffer) == buffer.maxlen:
            if buffer[0] is self._writing:
                self._writing_evicted = True  # counted once its write has failed
            else:
                self.dropped += 1
        buffer.append(event)
        self._empty.clear()
        self._wake.set()

    async def publish(self, event: FeedbackEvent) -> None:
        """Core's ``FeedbackPublisher.publish``: buffer ``event`` and return at once.

        Args:
            event: the feedback event.
        """
        self.offer(event)

    @property
    def buffered(self) -> int:
        """Events waiting for Redis."""
        return len(self._buffer)

    def encode(self, event: FeedbackEvent) -> bytes:
        """The stream entry's ``data`` field: Core's codec envelope of ``event``."""
        return self._codec.encode(FEEDBACK_SCHEMA_ID, event, key=event.coordinator_id)

    async def run(self) -> None:
        """Write buffered events in order until cancelled; retry while Redis is away."""
        delay = RETRY_INITIAL_S
        buffer = self._buffer
        while True:
            reraise_swallowed_cancel()  # redis-py waits for some replies with wait_for
            if not buffer:
                self._empty.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            event = buffer[0]
            try:
                data = self.encode(event)
            except Exception as exc:  # cannot happen with Core's model; never retry it
                log.error("a feedback event cannot be encoded for Redis; dropped: %s", exc)
                buffer.popleft()
                self.dropped += 1
                continue
            self._writing, self._writing_evicted = event, False
            try:
                await self._redis.xadd(
                    self.key, {"data": data}, maxlen=self.maxlen, approximate=True
                )
            except Exception as exc:  # redis errors, OSError, timeouts: all mean "not now"
                self._writing = None
                if self._writing_evicted:
                    self.dropped += 1  # pushed out of the full buffer meanwhile
                self._failed(exc)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._writing = None
            delay = RETRY_INITIAL_S
            if not self._writing_evicted:
                buffer.popleft()
            self.published += 1
            if self.up is not True:
                if self.up is False:
                    log.warning(
                        "feedback reaches Redis %s again (%d events dropped so far)",
                        self.url,
                        self.dropped,
                    )
                self.up = True
                self.last_error = ""

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.up is not False:
            log.error(
                "feedback cannot reach Redis %s (retrying; NATS feedback goes on): %s",
                self.url,
                self.last_error,
            )
        self.up = False

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the buffer to be written; True when it was."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the connection pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._redis.aclose()
        except Exception as exc:  # closing a dead connection may fail; nothing is lost
            log.debug("closing the Redis client: %s", exc)

    def component(self) -> HealthComponent:
        """The ``feedback-redis`` health component: degraded while Redis is unreachable."""
        state = "degraded" if self.up is False else "healthy"
        return HealthComponent(
            name="feedback-redis",
            state=state,
            details={
                "url": self.url,
                "stream": self.key,
                "reachable": "unknown" if self.up is None else str(self.up).lower(),
                "published": str(self.published),
                "buffered": str(self.buffered),
                "dropped": str(self.dropped),
                "failures": str(self.failures),
                "last_error": self.last_error,
            },
        )
