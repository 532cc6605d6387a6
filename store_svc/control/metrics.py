"""The HTTP endpoint on ``STORE_METRICS_PORT``: Prometheus ``/metrics`` and the
``/healthz`` / ``/readyz`` probes (``probes.py``), served from threads.

Counters and gauges are read from the service's own counters when scraped, so the
hot path pays nothing for them; the two histograms (records per commit, commit
latency) are observed once per batch. Each service has its own registry, so
several services in one process (tests) do not collide.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from store_svc.control.probes import HealthSnapshot
from store_svc.core import BackpressureLevel
from store_svc.state import ServiceView, Stats

__all__ = ["Metrics"]

_LEVEL_VALUE = {BackpressureLevel.ok: 0, BackpressureLevel.soft: 1, BackpressureLevel.hard: 2}
_STATE_VALUE = {"healthy": 0, "degraded": 1, "unhealthy": 2}


class _StoreCollector(Collector):
    def __init__(self, svc: ServiceView, snapshot: HealthSnapshot) -> None:
        self._svc = svc
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        """Nothing: the registry then does not collect at registration, so metrics
        can be built before the parts the view reads (the batcher reports to them)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        stats = svc.stats

        def per(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        yield per(
            "store_records_received",
            "Records received, valid or not.",
            "kind",
            dict(stats.received),
        )
        yield per(
            "store_records_committed",
            "Records committed to the database.",
            "kind",
            dict(stats.committed),
        )
        yield per(
            "store_records_rejected",
            "Records rejected (sent to the DLQ).",
            "kind",
            dict(stats.rejected_by_kind),
        )
        yield per(
            "store_records_rejected_by_reason",
            "Records rejected, by reason.",
            "reason",
            dict(stats.rejected),
        )
        yield per(
            "store_messages_dropped",
            "Write messages the NATS client dropped as a slow consumer.",
            "kind",
            dict(stats.dropped_by_kind),
        )
        queries = CounterMetricFamily(
            "store_queries",
            "Read API requests answered, by endpoint (query, latest) and outcome "
            "(ok or the error reason).",
            labels=["endpoint", "outcome"],
        )
        for key, value in sorted(stats.queries.items()):
            queries.add_metric(key.split(":", 1), value)
        yield queries
        yield CounterMetricFamily(
            "store_query_records", "Records sent in read API replies.", value=stats.query_records
        )
        yield CounterMetricFamily(
            "store_writes_refused_overload",
            "Request-reply writes refused with 503 at the hard watermark.",
            value=stats.refused_overload,
        )
        yield CounterMetricFamily(
            "store_sink_errors", "Failed commit attempts.", value=stats.sink_errors
        )
        yield CounterMetricFamily("store_batches", "Transactions committed.", value=stats.batches)
        yield GaugeMetricFamily("store_queue_depth", "Records queued.", value=svc.queue_depth)
        yield GaugeMetricFamily(
            "store_queue_capacity", "Queue capacity in records.", value=svc.queue_capacity
        )
        yield GaugeMetricFamily(
            "store_backpressure_level",
            "Backpressure level: 0 ok, 1 soft, 2 hard.",
            value=_LEVEL_VALUE[svc.level],
        )
        yield GaugeMetricFamily(
            "store_sink_up",
            "1 while commits succeed, 0 while they fail.",
            value=1 if svc.sink_ok else 0,
        )
        connected = GaugeMetricFamily(
            "store_nats_connected", "1 while the connection is up.", labels=["connection"]
        )
        faults = CounterMetricFamily(
            "store_nats_faults",
            "nats-py tasks that ended under a connected client (each one reconnected).",
            labels=["connection"],
        )
        disconnects = CounterMetricFamily(
            "store_nats_disconnects",
            "Connections lost while in use, by connection (ingest, control).",
            labels=["connection"],
        )
        denials = CounterMetricFamily(
            "store_nats_permission_denials",
            "Publishes and subscriptions the server refused (Permissions Violation).",
            labels=["connection"],
        )
        reconnects = CounterMetricFamily(
            "store_nats_reconnects",
            "Reconnects of the client, by connection (ingest, control).",
            labels=["connection"],
        )
        for conn in svc.connections:
            connected.add_metric([conn.role], 1 if conn.connected else 0)
            faults.add_metric([conn.role], conn.faults)
            disconnects.add_metric([conn.role], conn.disconnects)
            denials.add_metric([conn.role], conn.permission_denials)
            reconnects.add_metric([conn.role], int(conn.figures().get("reconnects", 0)))
        yield connected
        yield faults
        yield disconnects
        yield denials
        yield reconnects
        yield CounterMetricFamily(
            "store_dlq_publish_failures",
            "Rejected records that could not be published to the DLQ.",
            value=stats.dlq_failed,
        )
        if svc.ingest_mode == "jetstream":
            yield from _jetstream_metrics(stats)
        if svc.retention:
            yield from _retention_metrics(stats)
        yield from _feedback_metrics(svc)
        yield from self._health_metrics()

    def _health_metrics(self) -> Iterator[Metric]:
        status, ready = self._snapshot.current()
        yield GaugeMetricFamily(
            "store_ready", "1 while the service is ready for writes (as /readyz).", value=int(ready)
        )
        states = GaugeMetricFamily(
            "store_health_state",
            "Health of each component (HealthStatus.components): 0 healthy, 1 degraded, "
            "2 unhealthy; component 'service' is the overall state.",
            labels=["component"],
        )
        states.add_metric(["service"], _STATE_VALUE.get(status.state, 2))
        for component in status.components:
            states.add_metric([component.name], _STATE_VALUE.get(component.state, 2))
        yield states


def _jetstream_metrics(stats: Stats) -> Iterator[Metric]:
    messages = CounterMetricFamily(
        "store_jetstream_messages",
        "JetStream messages by what became of them: acked (after their commit), "
        "handed_back (nak while stopping), terminated (on the DLQ), redelivered "
        "(received more than once), in_progress (held long).",
        labels=["outcome"],
    )
    messages.add_metric(["acked"], stats.js_acked)
    messages.add_metric(["handed_back"], stats.js_naked)
    messages.add_metric(["terminated"], stats.js_termed)
    messages.add_metric(["redelivered"], stats.js_redelivered)
    messages.add_metric(["in_progress"], stats.js_in_progress)
    yield messages
    yield CounterMetricFamily(
        "store_jetstream_pull_resets",
        "Pull requests given up as forgotten by the server.",
        value=stats.js_pull_resets,
    )


def _feedback_metrics(svc: ServiceView) -> Iterator[Metric]:
    events = CounterMetricFamily(
        "store_feedback_events",
        "Feedback events published, by outlet (nats, redis).",
        labels=["outlet"],
    )
    events.add_metric(["nats"], svc.feedback_published)
    redis = svc.feedback_redis
    if redis is None:
        yield events
        return
    events.add_metric(["redis"], redis.published)
    yield events
    yield CounterMetricFamily(
        "store_feedback_redis_dropped",
        "Feedback events dropped from the Redis buffer while Redis was away.",
        value=redis.dropped,
    )
    yield CounterMetricFamily(
        "store_feedback_redis_failures",
        "Failed writes of feedback to Redis (each retried).",
        value=redis.failures,
    )
    yield GaugeMetricFamily(
        "store_feedback_redis_up",
        "1 while feedback reaches Redis, 0 while it cannot.",
        value=0 if redis.up is False else 1,
    )


def _retention_metrics(stats: Stats) -> Iterator[Metric]:
    removed = CounterMetricFamily(
        "store_retention_removed",
        "Rows removed by retention, per kind (hypertables: from the planner's statistics).",
        labels=["kind"],
    )
    for kind, n in sorted(stats.retention_removed.items()):
        removed.add_metric([kind], n)
    yield removed
    passes = CounterMetricFamily(
        "store_retention_passes",
        "Retention passes: done here, skipped (another instance ran it), failed.",
        labels=["outcome"],
    )
    passes.add_metric(["done"], stats.retention_done)
    passes.add_metric(["skipped"], stats.retention_skipped)
    passes.add_metric(["failed"], stats.retention_failed)
    yield passes
    if stats.retention_last_pass is not None:
        yield GaugeMetricFamily(
            "store_retention_last_pass_timestamp_seconds",
            "When the last retention pass ran or was skipped (Unix time).",
            value=stats.retention_last_pass,
        )


class _Server(ThreadingMixIn, WSGIServer):
    # A thread per request: a slow scrape never holds up a probe.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes arrive every few seconds; they are not worth a log line."""


def _app(registry: CollectorRegistry, snapshot: HealthSnapshot) -> Any:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
                return [b""]
            code, body = snapshot.answer(path)
            head = environ["REQUEST_METHOD"] == "HEAD"
            start_response(
                "200 OK" if code == 200 else "503 Service Unavailable",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [b"" if head else body]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


class Metrics:
    """The service's metrics and, when started, their HTTP endpoint.

    Args:
        svc: what the service shows of itself (its counters are exported).
        snapshot: what ``/healthz`` and ``/readyz`` answer from.
    """

    def __init__(self, svc: ServiceView, snapshot: HealthSnapshot) -> None:
        self._snapshot = snapshot
        # Its collector names nothing up front (see _StoreCollector.describe): such
        # collectors must still answer a scrape filtered by name (?name[]=...).
        self.registry = CollectorRegistry(auto_describe=True, support_collectors_without_names=True)
        self.registry.register(_StoreCollector(svc, snapshot))
        self.batch_records = Histogram(
            "store_batch_records",
            "Records per committed batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "store_commit_seconds",
            "Time to commit one batch, retries included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )
        self.query_seconds = Histogram(
            "store_query_seconds",
            "Time to answer a read API request (successful ones), by endpoint.",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_commit(self, records: int, seconds: float) -> None:
        """Record one committed batch.

        Args:
            records: records in the batch.
            seconds: time from the first attempt to the commit.
        """
        self.batch_records.observe(records)
        self.commit_seconds.observe(seconds)

    def observe_query(self, endpoint: str, seconds: float) -> None:
        """Record one successful read API answer.

        Args:
            endpoint: ``query`` or ``latest``.
            seconds: time from the request's arrival to the reply.
        """
        self.query_seconds.labels(endpoint).observe(seconds)

    @property
    def port(self) -> int | None:
        """The port the endpoint listens on, once started."""
        return self._server.server_port if self._server is not None else None

    def start(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``port`` (0 picks a free
        port) from daemon threads.

        Args:
            port: TCP port.
            addr: address to bind.
        """
        server = make_server(
            addr,
            port,
            _app(self.registry, self._snapshot),
            server_class=_Server,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop the endpoint; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
