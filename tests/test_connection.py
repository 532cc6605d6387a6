"""The service's NATS connections cannot die silently (real nats-server, real faults)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from store_svc.bus.client import OrderedFlushClient
from store_svc.bus.connection import NatsConnection
from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings
from store_svc.tasks import cancel_and_wait

from .conftest import connected, until
from .test_bad_input import trade


@contextmanager
def frozen(server: NatsServer) -> Iterator[None]:
    """The server process stopped (SIGSTOP) for the block, as a stalled peer would be;
    nothing sent from the block's start on is answered before it ends."""
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


async def late_pong(nc: Client, server: NatsServer) -> None:
    """An RTT probe whose PONG comes back after the probe has given up."""
    with frozen(server), pytest.raises(NatsTimeout):
        await nc.rtt(timeout=0.2)  # type: ignore[arg-type]
    # The PONG arrives once the server runs again.


async def responder(url: str) -> Client:
    nc = OrderedFlushClient()
    await nc.connect(url)

    async def echo(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await nc.subscribe("echo", cb=echo)
    await nc.flush()
    return nc


def test_the_overridden_pong_handler_still_exists_upstream() -> None:
    params = list(inspect.signature(Client._process_pong).parameters)
    assert params == ["self"], "nats-py changed _process_pong; review store_svc/bus/client.py"


async def test_a_late_pong_kills_plain_nats_py_but_not_the_service_client(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await responder(nats_server.url)
    try:
        plain = Client()
        await plain.connect(nats_server.url)
        await late_pong(plain, nats_server)
        # nats-py 2.16: InvalidStateError ends the read loop; the socket stays open, so
        # the client still says it is connected while it reads nothing. When this fails,
        # nats-py has fixed it and OrderedFlushClient._process_pong can go.
        await until(lambda: plain._reading_task is not None and plain._reading_task.done())
        assert plain.is_connected
        assert "encountered error" in caplog.text
        with pytest.raises(NatsTimeout):
            await plain.request("echo", b"1", timeout=0.5)
        await plain.close()

        ours = OrderedFlushClient()
        await ours.connect(nats_server.url)
        before = ours._pongs_received
        await late_pong(ours, nats_server)
        await until(lambda: ours._pongs_received > before)  # the late PONG was read
        assert ours._reading_task is not None
        assert not ours._reading_task.done()
        reply = await ours.request("echo", b"2", timeout=2)
        assert reply.data == b"pong:2"
        # Later round trips are matched with their own PONGs.
        assert await ours.rtt(timeout=2) < 2  # type: ignore[arg-type]
        await ours.close()
    finally:
        await echo.close()


async def test_the_service_answers_and_stores_after_a_late_pong(
    make_settings: Callable[..., Settings], nats_server: NatsServer, client: Client
) -> None:
    # The service's own RTT probes time out while the server is frozen (2 s).
    async with StoreService(make_settings(feedback_heartbeat_s=0.1)) as svc:
        with frozen(nats_server):
            await asyncio.sleep(2.6)
        await until(lambda: None not in (svc.ingest_nats.rtt_ms, svc.control_nats.rtt_ms))
        reply = await client.request("mdp.store.health", b"", timeout=2)
        status = HealthStatus.model_validate_json(reply.data)
        assert status.state == "healthy"
        reply = await client.request("mdp.store.write.trades", json.dumps(trade()).encode(), 5)
        assert json.loads(reply.data)["accepted"] == 1
        # The PONG fix kept the read loops alive: no fault, no reconnect was needed.
        for conn in (svc.ingest_nats, svc.control_nats):
            assert conn.faults == 0, conn.last_fault
            assert conn.nc.stats["reconnects"] == 0


def break_read_loop(nc: Client) -> None:
    """Make nats-py's parser fail once, as the late PONG did: the read loop logs
    ``nats: encountered error`` and ends with the socket still open."""
    parser: Any = nc._ps
    original = parser.parse

    async def failing(data: bytes) -> None:
        parser.parse = original
        raise RuntimeError("injected parser failure")

    parser.parse = failing


async def stats_data(client: Client) -> dict[str, Any]:
    reply = await client.request("$SRV.STATS.market-data-store", b"", timeout=2)
    endpoints = json.loads(reply.data)["endpoints"]
    data: dict[str, Any] = next(e for e in endpoints if e["name"] == "health")["data"]
    return data


@pytest.mark.parametrize("role", ["ingest", "control"])
async def test_a_dead_read_loop_is_a_counted_fault_and_the_connection_comes_back(
    make_settings: Callable[..., Settings],
    client: Client,
    role: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with StoreService(make_settings()) as svc:
        conn = svc.ingest_nats if role == "ingest" else svc.control_nats
        break_read_loop(conn.nc)
        # Any traffic on the connection reaches the parser (and is lost with it).
        await client.publish("mdp.store.health", b"")
        await client.publish("mdp.store.write.trades", json.dumps(trade(size=1)).encode())
        await until(lambda: conn.faults == 1 and conn.nc.stats["reconnects"] == 1, timeout=15)
        assert "read loop ended" in conn.last_fault
        assert f"NATS {role} connection fault #1" in caplog.text
        # Both connections answer again: health on control, a stored write on ingest.
        async with asyncio.timeout(15):
            while True:
                try:
                    reply = await client.request(
                        "mdp.store.write.trades", json.dumps(trade(size=2)).encode(), timeout=1
                    )
                    break
                except (NatsTimeout, NoRespondersError):
                    # Until the server has the re-sent subscription, a request finds no
                    # responder (or the one it found was the broken read loop).
                    continue
        assert json.loads(reply.data)["accepted"] == 1
        reply = await client.request("mdp.store.health", b"", timeout=2)
        status = HealthStatus.model_validate_json(reply.data)
        details = next(c for c in status.components if c.name == f"nats-{role}").details
        assert details["faults"] == "1"
        assert details["connected"] == "true"
        assert (await stats_data(client))["nats"][role]["faults"] == 1
        # The other connection was not touched: they reconnect independently.
        other = svc.control_nats if role == "ingest" else svc.ingest_nats
        assert other.faults == 0
        assert other.nc.stats["reconnects"] == 0
        assert not svc.connection_lost.is_set()


async def test_a_connection_that_cannot_reconnect_is_reported_lost(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    lost = asyncio.Event()
    conn = NatsConnection("ingest", make_settings(), on_lost=lost.set)
    async with conn:
        conn.nc.options["allow_reconnect"] = False  # force_reconnect() then does nothing
        assert conn.nc._reading_task is not None
        conn.nc._reading_task.cancel()
        await asyncio.wait_for(lost.wait(), 10)
        assert conn.faults == 1
        assert "could not be re-established" in caplog.text
        assert conn.nc.is_closed


FLOOD = """
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    for _ in range(3000):
        await nc.publish("mdp.store.write.trades", b"x" * 8000)
    await nc.flush()
    await nc.close()

asyncio.run(main())
"""


async def test_a_slow_consumer_cut_off_by_the_server_is_counted_and_survived(
    tmp_path: Path, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that allows little pending data per client and a short write deadline:
    # a client that reads nothing for a few seconds is cut off as a slow consumer, and
    # the server tells the client nothing but EOF.
    conf = tmp_path / "nats.conf"
    conf.write_text('max_pending: 262144\nmax_payload: 65536\nwrite_deadline: "1s"\n')
    with NatsServer(extra_args=("-c", str(conf))) as server:
        settings = load_settings(nats_url=server.url, database_url=f"sqlite:///{db_path}")
        async with StoreService(settings) as svc:
            publisher = subprocess.Popen([sys.executable, "-c", FLOOD, server.url])  # noqa: ASYNC220
            try:
                # Blocking on purpose: the service's event loop reads nothing meanwhile.
                time.sleep(4)  # noqa: ASYNC251
                publisher.wait(30)
            finally:
                publisher.kill()
            await until(lambda: svc.ingest_nats.nc.stats["reconnects"] >= 1, timeout=20)
            assert svc.ingest_nats.disconnects >= 1
            assert svc.ingest_nats.server_closed >= 1
            assert svc.ingest_nats.faults == 0
            assert any(b"Slow Consumer" in line for line in server.log)
            assert "slow consumer" in caplog.text
            async with connected(server.url) as client:
                reply = await client.request("mdp.store.health", b"", timeout=2)
                status = HealthStatus.model_validate_json(reply.data)
                details = next(c for c in status.components if c.name == "nats-ingest").details
                assert int(details["server_closed"]) >= 1
                reply = await client.request(
                    "mdp.store.write.trades", json.dumps(trade()).encode(), timeout=5
                )
                assert json.loads(reply.data)["accepted"] == 1


@pytest.fixture(autouse=True)
def _quiet_nats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def test_a_start_cancelled_while_nats_is_unreachable_leaves_no_task(
    tmp_path: Path,
) -> None:
    """A signal during start-up cancels it: nats-py's connect, which would go on trying
    an unreachable server for ever, ends with it."""
    settings = load_settings(
        nats_url="nats://127.0.0.1:1",  # nothing listens there: refused at once, retried
        nats_connect_timeout_s=300,
        database_url=f"sqlite:///{tmp_path}/x.db",
    )
    svc = StoreService(settings)
    before = asyncio.all_tasks()
    starting = asyncio.create_task(svc.start())
    await asyncio.sleep(1.5)  # a few connection attempts
    assert not starting.done()
    await cancel_and_wait(starting)
    assert starting.cancelled()
    left = asyncio.all_tasks() - before - {starting}
    assert not left, [task.get_coro() for task in left]
