"""The control plane: a NATS micro service (ADR-32) with health and readiness.

The service shows up as ``market-data-store`` on ``$SRV.PING``, ``$SRV.INFO`` and
``$SRV.STATS`` (all three subject forms, one id per instance), with the endpoints:

* ``health`` on ``<prefix>.store.health``: Core ``HealthStatus`` JSON;
* ``ready`` on ``<prefix>.store.ready``: the same, plus ``Nats-Service-Error:
  not ready: <reason>`` / ``Nats-Service-Error-Code: 503`` when not ready.

Endpoint stats carry the store's own figures in ``data`` (queue depth, level,
rows committed, rejected, dropped). Handlers only read in-memory state.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig

from store_svc import __version__
from store_svc.constants import SERVICE_NAME
from store_svc.control.health import health_status, readiness
from store_svc.settings import Settings
from store_svc.state import ServiceView

__all__ = ["ControlPlane"]

DESCRIPTION = "Stores Core market data (bars, trades, quotes, options) from NATS write subjects"


class ControlPlane:
    """Owns the micro service of one store instance.

    Args:
        settings: subjects, queue group and the metadata announced in ``$SRV.INFO``.
        svc: what the service shows of itself (health, readiness, stats).
    """

    def __init__(self, settings: Settings, svc: ServiceView) -> None:
        self._settings = settings
        self._svc = svc
        self.micro: Service | None = None

    async def start(self, nc: NATS) -> None:
        """Register the micro service and its endpoints on ``nc``.

        Args:
            nc: a connected client.
        """
        settings = self._settings
        self.micro = await add_service(
            nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version=__version__,
                description=DESCRIPTION,
                metadata={
                    "subject_prefix": settings.subject_prefix,
                    "ingest_mode": settings.ingest_mode,
                    "sink": self._svc.sink_name,
                    "coordinator_id": settings.coordinator_id,
                },
                queue_group=settings.queue_group,
                stats_handler=self._stats,
            ),
        )
        await self.micro.add_endpoint(
            name="health", subject=settings.subject("store", "health"), handler=self._health
        )
        await self.micro.add_endpoint(
            name="ready", subject=settings.subject("store", "ready"), handler=self._ready
        )
        await nc.flush()

    @property
    def id(self) -> str | None:
        """The micro service instance id."""
        return self.micro.info().id if self.micro is not None else None

    async def stop(self) -> None:
        """Unregister the micro service; idempotent."""
        micro, self.micro = self.micro, None
        if micro is not None:
            await micro.stop()

    async def _health(self, req: Request) -> None:
        await req.respond(health_status(self._svc).model_dump_json().encode())

    async def _ready(self, req: Request) -> None:
        ready, reason, status = readiness(self._svc)
        body = status.model_dump_json().encode()
        if ready:
            await req.respond(body)
        else:
            await req.respond_error("503", f"not ready: {reason}", data=body)

    def _stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        svc = self._svc
        stats = svc.stats
        return {
            "queue_depth": svc.queue_depth,
            "queue_capacity": svc.queue_capacity,
            "level": svc.level.value,
            "rows_committed": stats.committed_total,
            "rejected": stats.rejected_total,
            "dropped": stats.dropped_messages,
            "refused_overload": stats.refused_overload,
            "sink_errors": stats.sink_errors,
            "queries": sum(n for k, n in stats.queries.items() if k.endswith(":ok")),
            "query_errors": sum(n for k, n in stats.queries.items() if not k.endswith(":ok")),
            "nats": {conn.role: conn.figures() for conn in svc.connections},
        }
