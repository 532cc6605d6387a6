"""Each part on its own: health, metrics and the read API take only what they read,
errors cross the worker boundary as codes, background tasks are owned, the queue
signals room, and a service starts once."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BadRequestError, ServerError, ServiceUnavailableError
from prometheus_client import generate_latest

from store_svc.bus.client import OrderedFlushClient
from store_svc.control.health import health_status, readiness
from store_svc.control.metrics import Metrics
from store_svc.control.probes import HealthSnapshot
from store_svc.core import BackpressureLevel, HealthComponent
from store_svc.errors import JetStreamUnanswered, JetStreamUnavailable, SchemaError, SinkError
from store_svc.ingest.decode import PayloadDecoder
from store_svc.ingest.edge import IntakeParts
from store_svc.ingest.jetstream import JetStreamIntake, pull_size, room_needed
from store_svc.ingest.jetstream_setup import ensure_stream_and_consumer
from store_svc.ingest.queue import Envelope, RecordQueue
from store_svc.read.api import QueryApi
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings
from store_svc.state import ConnectionView, RedisOutletView, Stats, Status
from store_svc.store import sqlite_worker
from store_svc.store.sqlite import SqliteSink
from store_svc.store.sqlite_process import reply_error
from store_svc.store.sqlite_read import SqliteReader
from store_svc.tasks import TaskSet

from .conftest import until
from .test_queue_batcher import _Level


@dataclass
class _Conn:
    role: str
    connected: bool = True
    faults: int = 0
    disconnects: int = 0
    permission_denials: int = 0

    def component(self) -> HealthComponent:
        return HealthComponent(
            name=f"nats-{self.role}", state="healthy" if self.connected else "unhealthy"
        )

    def figures(self) -> dict[str, Any]:
        return {"faults": self.faults}


@dataclass
class _View:
    """A hand-made ServiceView: what health and metrics read, and nothing else."""

    status: Status = Status.RUNNING
    paused: bool = False
    warnings: Sequence[str] = ()
    stats: Stats = field(default_factory=Stats)
    ingest_mode: str = "core"
    sink_name: str = "memory"
    sink_details: dict[str, str] = field(default_factory=dict)
    sink_progress: str = ""
    retention: dict[str, str] = field(default_factory=dict)
    queue_depth: int = 0
    queue_capacity: int = 100
    in_flight: int = 0
    sink_ok: bool = True
    level: BackpressureLevel = BackpressureLevel.ok
    loop_lag_ms: float = 0.0
    connections: Sequence[ConnectionView] = (_Conn("ingest"), _Conn("control"))
    feedback_redis: RedisOutletView | None = None
    feedback_published: int = 0


@pytest.mark.logic
async def test_health_and_readiness_read_only_the_view() -> None:
    view = _View()
    assert health_status(view).state == "healthy"
    assert readiness(view)[:2] == (True, "")

    view.level, view.queue_depth = BackpressureLevel.soft, 60
    status = health_status(view)
    queue = next(c for c in status.components if c.name == "queue")
    assert (status.state, queue.state, queue.details["depth"]) == ("degraded", "degraded", "60")

    view.sink_ok = False
    assert readiness(view)[:2] == (False, "the database is failing commits")
    view.sink_ok, view.connections = True, (_Conn("ingest", connected=False), _Conn("control"))
    assert readiness(view)[:2] == (False, "the NATS ingest connection is down")
    assert health_status(view).state == "unhealthy"
    view.connections, view.status = (_Conn("ingest"), _Conn("control")), Status.DRAINING
    assert readiness(view)[:2] == (False, "service is draining")


@pytest.mark.logic
async def test_metrics_read_only_the_view() -> None:
    view = _View(queue_depth=7, level=BackpressureLevel.hard, sink_ok=False)
    view.stats.committed["trades"] = 5
    view.connections = (_Conn("ingest", faults=2), _Conn("control", connected=False))
    view.feedback_published = 4
    snapshot = HealthSnapshot(5.0, lambda: readiness(view))
    metrics = Metrics(view, snapshot)
    assert 'store_health_state{component="loop"} 2.0' in generate_latest(metrics.registry).decode()
    snapshot.refresh()  # before the first snapshot: unhealthy, not ready
    metrics.observe_query("latest", 0.01)
    text = generate_latest(metrics.registry).decode()
    for line in (
        "store_ready 0.0",
        'store_health_state{component="service"} 2.0',
        'store_health_state{component="sink"} 2.0',
        'store_feedback_events_total{outlet="nats"} 4.0',
        'store_nats_reconnects_total{connection="ingest"} 0.0',
        "store_queue_depth 7.0",
        "store_backpressure_level 2.0",
        "store_sink_up 0.0",
        'store_records_committed_total{kind="trades"} 5.0',
        'store_nats_faults_total{connection="ingest"} 2.0',
        'store_nats_connected{connection="control"} 0.0',
        'store_query_seconds_count{endpoint="latest"} 1.0',
    ):
        assert line in text, line
    # A scrape filtered by name (/metrics?name[]=...) still finds the collector's metrics.
    only = generate_latest(metrics.registry.restricted_registry(["store_queue_depth"])).decode()
    assert "store_queue_depth 7.0" in only
    assert "store_sink_up" not in only


async def test_the_read_api_alone_answers_a_failing_database_with_a_reason_code(
    make_settings: Callable[..., Settings], client: NATS, tmp_path: Path
) -> None:
    """A QueryApi with nothing but settings, a reader and counters; its reader cannot
    open the database, and the reply says so by code, without the driver's text."""
    settings = make_settings()
    stats = Stats()
    answered: list[str] = []
    reader = SqliteReader(tmp_path / "missing" / "store.db", 1, 100)
    api = QueryApi(lambda: settings, reader, stats, lambda e, s: answered.append(e))
    await api.start(client)
    try:
        msg = await client.request("mdp.store.query.bars", b'{"symbol": "A"}', timeout=10)
    finally:
        await api.stop(1.0)
    headers = msg.headers or {}
    assert headers["Nats-Service-Error-Code"] == "503"
    assert json.loads(msg.data) == {
        "error": "store_unavailable",
        "detail": "the database cannot be read now; retry later",
    }
    assert "sqlite" not in headers["Nats-Service-Error"].lower()
    assert stats.queries["query:store_unavailable"] == 1
    assert answered == []


@pytest.mark.logic
def test_worker_replies_are_judged_by_their_code_not_their_text() -> None:
    text = "schema version: anything at all"  # the text no longer decides
    assert type(reply_error(text, sqlite_worker.RETRY)) is SinkError
    assert reply_error(text, sqlite_worker.RETRY).retryable
    assert reply_error(text, sqlite_worker.AHEAD_FAILED).retryable
    assert not reply_error(text, sqlite_worker.REFUSED).retryable
    assert not reply_error(text, sqlite_worker.INTERNAL).retryable
    assert isinstance(reply_error("x", sqlite_worker.SCHEMA_TOO_NEW), SchemaError)
    assert reply_error(text, "True").retryable  # an unknown code never drops a batch
    assert {
        sqlite_worker.RETRY,
        sqlite_worker.REFUSED,
        sqlite_worker.SCHEMA_TOO_NEW,
        sqlite_worker.AHEAD_FAILED,
        sqlite_worker.INTERNAL,
    } == sqlite_worker.ERROR_CODES


async def test_a_newer_sqlite_schema_is_refused_by_code(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteSink(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    sink = SqliteSink(path)
    with pytest.raises(SchemaError, match="schema version 99"):
        await sink.open()
    await sink.close()


@pytest.mark.logic
async def test_the_queue_wakes_a_producer_waiting_for_room() -> None:
    queue = RecordQueue(10)
    for _ in range(3):
        queue.put_nowait(Envelope("trades", [()] * 3, 0.0))
    waiter = asyncio.ensure_future(queue.wait_room(below=5))
    await asyncio.sleep(0)
    queue.get_nowait()  # depth 6: not yet
    await asyncio.sleep(0)
    assert not waiter.done()
    queue.get_nowait()  # depth 3
    await asyncio.wait_for(waiter, 1)
    await queue.wait_room(below=5)  # already below: returns at once
    closing = asyncio.ensure_future(queue.wait_room(below=1))
    await asyncio.sleep(0)
    queue.close()
    await asyncio.wait_for(closing, 1)


@pytest.mark.logic
async def test_a_task_set_awaits_what_it_cancels_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet("owner")
    ended: list[str] = []

    async def sleeper(name: str, cleanup: float = 0.01) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(cleanup)  # cleanup that takes a while
            ended.append(name)

    async def failing() -> None:
        raise ValueError("boom")

    tasks.start("a", sleeper("a"))
    tasks.start("b", sleeper("b", cleanup=0.3))
    with pytest.raises(RuntimeError, match="already running"):
        tasks.start("a", sleeper("again"))
    tasks.start("f", failing())
    await asyncio.sleep(0)
    tasks.cancel("b")  # from a callback: not awaited here...
    assert tasks.get("b") is None
    await tasks.stop("a")
    assert ended == ["a"]
    with caplog.at_level(logging.ERROR, logger="store_svc.tasks"):
        await tasks.close()  # ...but here
    assert sorted(ended) == ["a", "b"]
    assert len(tasks) == 0
    assert "owner-f failed" in caplog.text


async def test_a_service_starts_once(make_settings: Callable[..., Settings]) -> None:
    async with StoreService(make_settings()) as svc:
        with pytest.raises(RuntimeError, match="start\\(\\) was called before"):
            await svc.start()
        assert svc.status is Status.RUNNING
        await until(lambda: svc.snapshot.answer("/readyz")[0] == 200)
    with pytest.raises(RuntimeError):
        await svc.start()


@pytest.mark.logic
@given(
    outstanding=st.integers(0, 255),
    per_msg=st.floats(0.5, 200_000, allow_nan=False),
    batch=st.integers(1, 256),
)
def test_the_pull_loop_waits_for_exactly_the_room_its_next_request_needs(
    outstanding: int, per_msg: float, batch: int
) -> None:
    # The JetStream intake waits for the queue to free this much room; a threshold
    # too strict loses the wake-up (the loop then polls), one too lax makes it spin.
    assume(outstanding < batch)
    need = room_needed(outstanding, per_msg, batch)
    assert pull_size(need, per_msg, batch) > outstanding
    assert need == 1 or pull_size(need - 1, per_msg, batch) <= outstanding


@pytest.mark.logic
@pytest.mark.parametrize(
    "description",
    ["Leadership Change", "Consumer Deleted", "Exceeded MaxRequestBatch of 1"],
)
async def test_a_pull_status_never_drops_a_check_still_due(description: str) -> None:
    """After a check of the consumer went unanswered (an election), the next check is
    due; a status that arrives meanwhile (here, a 409) must not cancel it, or health
    would show JetStream unanswered for good while pulls are served (seen in CI)."""
    settings = load_settings(ingest_mode="jetstream")
    intake = JetStreamIntake(
        IntakeParts(
            OrderedFlushClient(),
            settings,
            PayloadDecoder(1 << 20, 5.0),
            RecordQueue(capacity=1000),
            Stats(),
            _Level(),
        )
    )
    intake._recheck_consumer = True  # a check went unanswered
    intake._on_status({"Status": "409", "Description": description})
    assert intake._recheck_consumer, "the due check was dropped"


class _JetStreamSays:
    """A JetStream context whose first request fails with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def jetstream(self, timeout: float) -> _JetStreamSays:
        return self

    async def stream_info(self, name: str) -> None:
        raise self.exc


@pytest.mark.logic
@pytest.mark.parametrize(
    ("exc", "kind", "says"),
    [
        (NatsTimeout(), JetStreamUnanswered, "did not answer in time"),
        (
            ServiceUnavailableError(code=503, err_code=10008, description="temporarily"),
            JetStreamUnanswered,
            "JetStream is not available yet (temporarily, error 10008)",
        ),
        (
            BadRequestError(code=400, err_code=10005, description="no suitable peers"),
            JetStreamUnanswered,
            "no suitable JetStream peers (too few nodes up?) (no suitable peers, error 10005)",
        ),
        (ServiceUnavailableError(), JetStreamUnavailable, "JetStream enabled (nats-server -js)"),
        (
            ServiceUnavailableError(code=503, err_code=10039, description="not for account"),
            JetStreamUnavailable,
            "JetStream enabled (nats-server -js)",
        ),
        (
            ServerError(code=500, err_code=10074, description="non-clustered mode"),
            JetStreamUnavailable,
            "refused the set-up of stream STORE_WRITES or consumer store: non-clustered",
        ),
    ],
)
async def test_a_jetstream_set_up_error_says_whether_asking_again_may_help(
    exc: Exception, kind: type[Exception], says: str
) -> None:
    """Only what may pass (no answer, no leader yet, too few nodes yet) is asked
    again at start-up; no JetStream, or a refusal, stops it at once."""
    with pytest.raises(JetStreamUnavailable) as got:
        await ensure_stream_and_consumer(
            _JetStreamSays(exc),  # type: ignore[arg-type]
            load_settings(ingest_mode="jetstream"),
            "mdp.store.write.>",
        )
    assert type(got.value) is kind
    assert says in str(got.value)
