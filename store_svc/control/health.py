"""Health and readiness as Core ``HealthStatus``, built from the service's own state.

Only in-memory state is read, so an answer never waits on the database or on NATS
(a hung sink shows up as a stale last commit and the batcher's error, not as a
slow reply).

Components and their states:

==================  ================================================================
``nats-ingest``     the connection of the write traffic: healthy when connected;
                    degraded while the server refuses a publish (the last 60 s)
                    or a subscription (permission_denials); unhealthy while
                    disconnected (counters:
                    reconnects, disconnects, server_closed, faults)
``nats-control``    the connection of health, micro, control, reads and telemetry
``queue``           healthy at ``ok``; degraded at ``soft`` or ``hard``
``sink``            healthy while commits succeed; unhealthy while they fail (retrying);
                    ``layout`` (PostgreSQL: ``hypertables`` or ``plain``), ``opening``
                    (while start-up converts a table, say)
``intake``          healthy while taking writes; degraded while starting, paused or
                    draining, with a warning (a stream that captures the writes),
                    or while JetStream does not answer the store's checks or serve
                    its pull requests (``jetstream_unanswered_s``,
                    ``jetstream_unserved_s``: an election on a cluster;
                    ``jetstream_refused``: the consumer refuses them)
``retention``       (with a ``STORE_RETENTION_<KIND>``) healthy while passes succeed;
                    degraded after a failed one (keeps, passes, removed, last_error)
``feedback-redis``  (with ``STORE_FEEDBACK_REDIS_URL``) healthy while feedback
                    reaches Redis; degraded while it cannot (published, buffered,
                    dropped, failures, last_error); readiness does not depend on it
``loop``            the event loop: ``lag_ms`` (how late it runs); over HTTP,
                    unhealthy once it has been stuck for ``STORE_LOOP_STALL_S``
==================  ================================================================

The overall state is the worst component state (unhealthy > degraded > healthy).
*Ready* means: running (not starting, paused or draining), both NATS connections up,
and the sink committing; a service that is not ready answers ``ready`` with a 503
service error besides the status.
"""

from __future__ import annotations

import asyncio
import time

from store_svc import __version__
from store_svc.constants import SERVICE_NAME
from store_svc.control.probes import loop_component
from store_svc.core import BackpressureLevel, HealthComponent, HealthStatus
from store_svc.state import ServiceView, Status

__all__ = ["health_status", "readiness"]

_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}


def _worst(states: list[str]) -> str:
    return max(states, key=_RANK.__getitem__) if states else "healthy"


def health_status(svc: ServiceView) -> HealthStatus:
    """The service's health, component by component.

    Args:
        svc: what the service shows of itself.

    Returns:
        A Core ``HealthStatus`` (service ``market-data-store``).
    """
    loop = asyncio.get_running_loop()
    stats = svc.stats
    level = svc.level
    queue_c = HealthComponent(
        name="queue",
        state="healthy" if level is BackpressureLevel.ok else "degraded",
        details={
            "depth": str(svc.queue_depth),
            "capacity": str(svc.queue_capacity),
            "level": level.value,
            "in_flight": str(svc.in_flight),
        },
    )
    last = stats.last_commit_monotonic
    sink_c = HealthComponent(
        name="sink",
        state="healthy" if svc.sink_ok else "unhealthy",
        details={
            "backend": svc.sink_name,
            **svc.sink_details,
            **({"opening": svc.sink_progress} if svc.sink_progress else {}),
            "reachable": str(svc.sink_ok).lower(),
            "last_commit_age_s": f"{loop.time() - last:.3f}" if last is not None else "never",
            "last_error": stats.last_sink_error or "",
            "errors": str(stats.sink_errors),
            "rows_committed": str(stats.committed_total),
        },
    )
    running = svc.status is Status.RUNNING and not svc.paused
    # JetStream: stretches of checks unanswered, of pull requests unserved or refused.
    stalls = {
        key: f"{loop.time() - since:.1f}"
        for key, since in (
            ("jetstream_unanswered_s", stats.js_unanswered_since),
            ("jetstream_unserved_s", stats.js_unserved_since),
        )
        if since is not None
    }
    if stats.js_refused:
        stalls["jetstream_refused"] = stats.js_refused
    intake_c = HealthComponent(
        name="intake",
        state="healthy" if running and not svc.warnings and not stalls else "degraded",
        details={
            **({"warning": " | ".join(svc.warnings)[:1000]} if svc.warnings else {}),
            **stalls,
            "mode": svc.ingest_mode,
            "status": "paused" if svc.paused else svc.status.value,
            "messages": str(stats.messages),
            "rejected": str(stats.rejected_total),
            "dropped": str(stats.dropped_messages),
            "refused_overload": str(stats.refused_overload),
            **(
                {
                    "js_acked": str(stats.js_acked),
                    "js_redelivered": str(stats.js_redelivered),
                    "js_terminated": str(stats.js_termed),
                    "js_handed_back": str(stats.js_naked),
                    "js_pull_resets": str(stats.js_pull_resets),
                }
                if svc.ingest_mode == "jetstream"
                else {}
            ),
        },
    )
    components = [
        *(conn.component() for conn in svc.connections),
        queue_c,
        sink_c,
        intake_c,
        loop_component(svc.loop_lag_ms),
    ]
    if svc.retention:
        components.append(_retention_component(svc))
    if svc.feedback_redis is not None:
        components.append(svc.feedback_redis.component())
    return HealthStatus(
        service=SERVICE_NAME,
        state=_worst([c.state for c in components]),
        components=components,
        version=__version__,
        ts=time.time(),
    )


def _retention_component(svc: ServiceView) -> HealthComponent:
    """Healthy while passes succeed; degraded after a failed one (retried)."""
    stats = svc.stats
    last = stats.retention_last_pass
    return HealthComponent(
        name="retention",
        state="degraded" if stats.retention_last_error else "healthy",
        details={
            "keeps": ", ".join(f"{k} {v}" for k, v in svc.retention.items()),
            "passes": str(stats.retention_done),
            "skipped": str(stats.retention_skipped),
            "failed": str(stats.retention_failed),
            "removed": ", ".join(f"{k} {n}" for k, n in sorted(stats.retention_removed.items())),
            "last_pass_age_s": f"{time.time() - last:.0f}" if last is not None else "never",
            "last_error": stats.retention_last_error,
        },
    )


def readiness(svc: ServiceView) -> tuple[bool, str, HealthStatus]:
    """Whether the service should be sent writes now.

    Args:
        svc: what the service shows of itself.

    Returns:
        ``(ready, reason, status)``; ``reason`` says why not (empty when ready).
    """
    status = health_status(svc)
    if svc.status is not Status.RUNNING:
        doing = f": {svc.sink_progress}" if svc.sink_progress else ""
        return False, f"service is {svc.status.value}{doing}", status
    if svc.paused:
        return False, "intake is paused", status
    for conn in svc.connections:
        if not conn.connected:
            return False, f"the NATS {conn.role} connection is down", status
    if not svc.sink_ok:
        return False, "the database is failing commits", status
    return True, "", status
