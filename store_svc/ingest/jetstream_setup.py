"""The JetStream stream and durable consumer the intake pulls from, created at
start-up when missing (``STORE_JS_CREATE``, on by default) or checked when present."""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import NotFoundError, ServiceUnavailableError

from store_svc.errors import ConfigError, JetStreamUnanswered, JetStreamUnavailable
from store_svc.settings import Settings

__all__ = ["ensure_stream_and_consumer"]

log = logging.getLogger(__name__)

#: The JetStream API's error code for "JetStream system temporarily unavailable": a
#: cluster without a meta leader says so (an election, too few nodes up).
JS_TEMPORARILY_UNAVAILABLE = 10008


async def ensure_stream_and_consumer(
    nc: NATS, settings: Settings, subject: str, check_timeout: float = 5.0
) -> None:
    """Make sure the stream over ``subject`` and the durable consumer exist.

    Args:
        nc: the ingest connection's client.
        settings: the ``js_*`` settings.
        subject: the write subjects' wildcard.
        check_timeout: seconds the stream and consumer info requests may take
            (creating either may take 5 s: an R3 creation on a busy cluster is slow).

    Raises:
        JetStreamUnanswered: JetStream did not answer in time, or is not available yet
            (asking again may succeed).
        JetStreamUnavailable: the server has no JetStream, or refused a request.
        ConfigError: the stream or consumer is missing and ``js_create`` is off.
    """
    s = settings
    js = nc.jetstream(timeout=5.0)
    check = nc.jetstream(timeout=check_timeout)
    try:
        try:
            info = await check.stream_info(s.js_stream)
        except NotFoundError:
            if not s.js_create:
                raise ConfigError(
                    f"the JetStream stream {s.js_stream} does not exist and STORE_JS_CREATE is off"
                ) from None
            await js.add_stream(
                api.StreamConfig(
                    name=s.js_stream,
                    subjects=[subject],
                    retention=api.RetentionPolicy(s.js_retention),
                    storage=api.StorageType(s.js_storage),
                    num_replicas=s.js_replicas,
                    max_age=s.js_max_age_s or None,
                )
            )
            log.info("created JetStream stream %s over %s", s.js_stream, subject)
        else:
            subjects = (info.config.subjects or []) if info.config else []
            if subject not in subjects:
                log.warning(
                    "stream %s captures %s, not %s: writes outside it are not seen",
                    s.js_stream,
                    subjects,
                    subject,
                )
        try:
            await check.consumer_info(s.js_stream, s.js_durable)
        except NotFoundError:
            if not s.js_create:
                raise ConfigError(
                    f"the JetStream consumer {s.js_durable} on stream {s.js_stream} does "
                    "not exist and STORE_JS_CREATE is off"
                ) from None
            await js.add_consumer(
                s.js_stream,
                api.ConsumerConfig(
                    durable_name=s.js_durable,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=s.js_ack_wait_s,
                    max_ack_pending=s.js_max_ack_pending,
                    filter_subject=subject,
                    num_replicas=s.js_replicas if s.js_replicas > 1 else None,
                ),
            )
            log.info("created JetStream consumer %s on %s", s.js_durable, s.js_stream)
    except ConfigError:
        raise
    except TimeoutError as exc:  # nats-py's own TimeoutError is one too
        raise JetStreamUnanswered(
            f"JetStream did not answer in time ({type(exc).__name__}: {exc}): on a cluster, "
            "too few nodes may be up to elect a leader"
        ) from exc
    except ServiceUnavailableError as exc:
        if exc.err_code == JS_TEMPORARILY_UNAVAILABLE:
            raise JetStreamUnanswered(
                f"JetStream is not available yet ({exc.description}): on a cluster, a "
                "leader is not elected yet"
            ) from exc
        raise JetStreamUnavailable(_no_jetstream(exc)) from exc
    except NatsError as exc:
        raise JetStreamUnavailable(_no_jetstream(exc)) from exc


def _no_jetstream(exc: Exception) -> str:
    return (
        f"JetStream did not answer ({type(exc).__name__}: {exc}); is the NATS server "
        "running with JetStream enabled (nats-server -js)?"
    )
