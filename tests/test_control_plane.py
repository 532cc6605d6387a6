"""Health, readiness and the NATS micro service, against a real server and sink."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import Status, StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import trade
from .test_ingest import locked

STORE_SVC = str(Path(sys.executable).parent / "store-svc")


async def ask(client: NATS, subject: str, timeout: float = 2.0) -> tuple[HealthStatus, Msg]:
    reply = await client.request(subject, b"", timeout=timeout)
    return HealthStatus.model_validate_json(reply.data), reply


def component(status: HealthStatus, name: str) -> Any:
    return next(c for c in status.components if c.name == name)


async def test_healthy_and_ready_when_running(service: StoreService, client: NATS) -> None:
    status, reply = await ask(client, "mdp.store.health")
    assert status.service == "market-data-store"
    assert status.state == "healthy"
    assert status.version
    assert [c.name for c in status.components] == [
        "nats-ingest",
        "nats-control",
        "queue",
        "sink",
        "intake",
        "loop",
    ]
    assert component(status, "nats-ingest").details["connected"] == "true"
    assert component(status, "nats-control").details["connected"] == "true"
    assert component(status, "queue").details["level"] == "ok"
    assert component(status, "intake").details["mode"] == "core"
    status, reply = await ask(client, "mdp.store.ready")
    assert not reply.headers
    assert status.state == "healthy"


async def test_sink_down_is_unhealthy_and_not_ready_and_health_stays_fast(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    async with StoreService(make_settings(sink_retry_max_s=0.2)) as svc:
        with locked(db_path):
            await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
            await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
            # The writer is stuck in SQLite's busy wait right now; health must not be.
            status, _ = await ask(client, "mdp.store.health", timeout=1.0)
            assert status.state == "unhealthy"
            sink = component(status, "sink")
            assert sink.state == "unhealthy"
            assert sink.details["reachable"] == "false"
            assert "locked" in sink.details["last_error"]
            status, reply = await ask(client, "mdp.store.ready", timeout=1.0)
            assert reply.headers is not None
            assert reply.headers["Nats-Service-Error-Code"] == "503"
            assert "database" in reply.headers["Nats-Service-Error"]
        await until(lambda: svc.batcher.sink_ok, timeout=20)
        # The outage held feedback at hard; it steps down once the dwell has passed.
        await until(lambda: svc.feedback.level.value == "ok", timeout=20)
        status, reply = await ask(client, "mdp.store.ready")
        assert not reply.headers
        assert status.state == "healthy"


async def test_draining_is_not_ready(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    svc = StoreService(make_settings(sink_retry_max_s=0.2))
    await svc.start()
    with locked(db_path):
        await client.publish("mdp.store.write.trades", json.dumps(trade()).encode())
        await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
        stopping = asyncio.create_task(svc.stop())
        await until(lambda: svc.status is Status.DRAINING)
        status, reply = await ask(client, "mdp.store.ready")
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "503"
        assert "draining" in reply.headers["Nats-Service-Error"]
        assert component(status, "intake").details["status"] == "draining"
    await asyncio.wait_for(stopping, 30)


async def test_nats_component_reports_the_connection(service: StoreService, client: NATS) -> None:
    await until(lambda: None not in (service.ingest_nats.rtt_ms, service.control_nats.rtt_ms))
    status, _ = await ask(client, "mdp.store.health")
    readings: list[float] = []
    for name in ("nats-ingest", "nats-control"):
        details = component(status, name).details
        assert 0 < float(details["rtt_ms"]) < 2000
        readings.append(float(details["rtt_ms"]))
        assert details["reconnects"] == "0"
        assert details["faults"] == "0"
        assert details["disconnects"] == "0"
    # A high-resolution clock: a loopback round trip is well under a millisecond but
    # never exactly zero (nats-py's own rtt() reads 0.000 or 1.000 here). One real
    # reading may fall on 1.000 by chance; both together, at 1 µs steps, do not.
    assert any(r not in (0.0, 1.0) for r in readings), readings


PING_FIELDS = {"type", "name", "id", "version", "metadata"}
INFO_FIELDS = PING_FIELDS | {"description", "endpoints"}
STATS_FIELDS = {"type", "name", "id", "version", "started", "endpoints"}
STATS_ENDPOINT_FIELDS = {
    "name",
    "subject",
    "queue_group",
    "num_requests",
    "num_errors",
    "last_error",
    "processing_time",
    "average_processing_time",
}


async def gather_replies(client: NATS, subject: str, wait: float = 0.5) -> list[dict[str, Any]]:
    """All answers to one request (several instances answer $SRV requests)."""
    inbox = client.new_inbox()
    got: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        got.append(json.loads(msg.data))

    sub = await client.subscribe(inbox, cb=collect)
    await client.publish(subject, b"", reply=inbox)
    await client.flush()
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return got


@pytest.mark.parametrize(
    "form", ["$SRV.{verb}", "$SRV.{verb}.market-data-store", "$SRV.{verb}.market-data-store.{id}"]
)
async def test_micro_service_answers_ping_info_stats(
    service: StoreService, client: NATS, form: str
) -> None:
    await client.request("mdp.store.health", b"", timeout=2)  # one request, for the stats
    sid = service.control.id
    assert sid
    ping_r = await gather_replies(client, form.format(verb="PING", id=sid))
    info_r = await gather_replies(client, form.format(verb="INFO", id=sid))
    stats_r = await gather_replies(client, form.format(verb="STATS", id=sid))
    assert len(ping_r) == len(info_r) == len(stats_r) == 1
    assert ping_r[0].keys() >= PING_FIELDS
    assert ping_r[0]["type"] == "io.nats.micro.v1.ping_response"
    assert ping_r[0]["name"] == "market-data-store"
    assert ping_r[0]["id"] == sid
    assert info_r[0].keys() >= INFO_FIELDS
    assert info_r[0]["type"] == "io.nats.micro.v1.info_response"
    assert info_r[0]["description"]
    assert {e["name"]: e["subject"] for e in info_r[0]["endpoints"]} == {
        "health": "mdp.store.health",
        "ready": "mdp.store.ready",
    }
    assert stats_r[0].keys() >= STATS_FIELDS
    assert stats_r[0]["type"] == "io.nats.micro.v1.stats_response"
    endpoints = {e["name"]: e for e in stats_r[0]["endpoints"]}
    assert endpoints["health"].keys() >= STATS_ENDPOINT_FIELDS
    assert endpoints["health"]["num_requests"] >= 1
    data = endpoints["health"]["data"]
    assert {"queue_depth", "level", "rows_committed", "rejected", "dropped"} <= data.keys()


async def test_several_instances_show_as_several_ids(
    make_settings: Callable[..., Settings], client: NATS, tmp_path: Path
) -> None:
    a = StoreService(make_settings(database_url=f"sqlite:///{tmp_path}/a.db"))
    b = StoreService(make_settings(database_url=f"sqlite:///{tmp_path}/b.db"))
    async with a, b:
        pings = await gather_replies(client, "$SRV.PING.market-data-store")
        assert sorted(p["id"] for p in pings) == sorted([a.control.id, b.control.id])


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
    env["STORE_NATS_URL"] = url
    return subprocess.run(
        [STORE_SVC, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_cli_health_and_ready(
    make_settings: Callable[..., Settings], nats_server: NatsServer, db_path: Path
) -> None:
    out = await asyncio.to_thread(cli, "ready", "--timeout", "1", url=nats_server.url)
    assert out.returncode == 1, "nothing is running yet"
    async with StoreService(make_settings(sink_retry_max_s=0.2)) as svc:
        out = await asyncio.to_thread(cli, "health", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        assert HealthStatus.model_validate_json(out.stdout).state == "healthy"
        out = await asyncio.to_thread(cli, "ready", url=nats_server.url)
        assert out.returncode == 0, out.stderr
        with locked(db_path):
            nc = NATS()
            await nc.connect(nats_server.url)
            await nc.publish("mdp.store.write.trades", json.dumps(trade()).encode())
            await nc.close()
            await until(lambda: svc.stats.sink_errors >= 1, timeout=20)
            out = await asyncio.to_thread(cli, "ready", url=nats_server.url)
            assert out.returncode == 1
            assert "not ready" in out.stderr
            out = await asyncio.to_thread(cli, "health", url=nats_server.url)
            assert out.returncode == 1
    out = await asyncio.to_thread(cli, "health", "--timeout", "1", url="nats://127.0.0.1:1")
    assert out.returncode == 1
    assert "cannot reach NATS" in out.stderr


async def test_starting_is_answered_and_not_ready(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    async with StoreService(make_settings()):
        pass  # create the database, so it can be locked below
    svc = StoreService(make_settings())
    with locked(db_path):  # the schema check waits for the lock: start-up hangs there
        starting = asyncio.create_task(svc.start())
        await until(lambda: svc.control.id is not None)
        # The micro service has an id before its endpoints are subscribed: until the
        # server has their subscriptions (start-up step 4 done), nobody responds.
        async with asyncio.timeout(10):
            while True:
                try:
                    status, reply = await ask(client, "mdp.store.ready")
                    break
                except NoRespondersError:
                    await asyncio.sleep(0.01)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "503"
        assert "starting" in reply.headers["Nats-Service-Error"]
        assert component(status, "intake").details["status"] == "starting"
        assert status.state == "degraded"
    await asyncio.wait_for(starting, 20)
    try:
        status, reply = await ask(client, "mdp.store.ready")
        assert not reply.headers
        assert status.state == "healthy"
    finally:
        await svc.stop()
