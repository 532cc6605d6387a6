"""The JetStream stream and durable consumer the intake pulls from, created at
start-up when missing (``STORE_JS_CREATE``, on by default) or checked when present."""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from store_svc.errors import ConfigError, JetStreamUnanswered, JetStreamUnavailable
from store_svc.settings import Settings

__all__ = ["ensure_stream_and_consumer"]

log = logging.getLogger(__name__)

#: The JetStream API's error codes that asking again may cure: "JetStream system
#: temporarily unavailable" (a cluster without a meta leader: an election, too few
#: nodes up) and "no suitable peers for placement" (a new leader that does not yet
#: count every node online, or a node down while an R3 stream is created).
JS_NOT_YET = {
    10008: "JetStream is not available yet",
    10005: "no suitable JetStream peers (too few nodes up?)",
}
#: "JetStream not enabled for account", "JetStream not enabled".
JS_NOT_ENABLED = {10039, 10076}


async def ensure_stream_and_consumer(
    nc: NATS,
    settings: Settings,
    subject: str,
    check_timeout: float = 5.0,
    create_timeout: float = 5.0,
) -> None:
    """Make sure the stream over ``subject`` and the durable consumer exist.

    Args:
        nc: the ingest connection's client.
        settings: the ``js_*`` settings.
        subject: the write subjects' wildcard.
        check_timeout: seconds the stream and consumer info requests may take.
        create_timeout: seconds creating either may take (an R3 creation on a busy
            cluster is slow).

    Raises:
        JetStreamUnanswered: JetStream did not answer in time, or is not available yet
            (asking again may succeed).
        JetStreamUnavailable: the server has no JetStream, or refused a request.
        ConfigError: the stream or consumer is missing and ``js_create`` is off.
    """
    s = settings
    js = nc.jetstream(timeout=create_timeout)
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
            f"JetStream did not answer in time ({type(exc).__name__}: {exc}): a cluster "
            "electing its leader, or another instance creating the same stream"
        ) from exc
    except APIError as exc:
        if exc.err_code in JS_NOT_YET:
            raise JetStreamUnanswered(
                f"{JS_NOT_YET[exc.err_code]} ({exc.description}, error {exc.err_code})"
            ) from exc
        no_responders = isinstance(exc, ServiceUnavailableError) and exc.err_code is None
        if no_responders or exc.err_code in JS_NOT_ENABLED:
            raise JetStreamUnavailable(_no_jetstream(exc)) from exc
        raise JetStreamUnavailable(
            f"JetStream refused the set-up of stream {s.js_stream} or consumer "
            f"{s.js_durable}: {exc.description} (error {exc.err_code}, code {exc.code})"
        ) from exc
    except NatsError as exc:
        raise JetStreamUnavailable(_no_jetstream(exc)) from exc


def _no_jetstream(exc: Exception) -> str:
    return (
        f"JetStream did not answer ({type(exc).__name__}: {exc}); is the NATS server "
        "running with JetStream enabled (nats-server -js)?"
    )
