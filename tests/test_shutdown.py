"""Clean shutdown of the real ``store-svc run`` process: nothing accepted is lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from store_svc.bus.client import OrderedFlushClient
from store_svc.devtools.natsserver import NatsServer
from store_svc.errors import ShutdownTimeout
from store_svc.runtime.service import Status, StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import trade
from .test_ingest import count, locked

pytestmark = pytest.mark.slow

STORE_SVC = str(Path(sys.executable).parent / "store-svc")


def start_service(server: NatsServer, db: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``store-svc run``; its log goes to ``<db>.log``."""
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STORE_")},
        "STORE_NATS_URL": server.url,
        "STORE_DATABASE_URL": f"sqlite:///{db}",
        **env,
    }
    with open(f"{db}.log", "wb") as log:
        return subprocess.Popen([STORE_SVC, "run"], env=full, stderr=log)


async def wait_until_serving(nc: nats.aio.client.Client, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                await nc.request(
                    "mdp.store.write.trades", json.dumps(trade(symbol="READY")).encode(), timeout=1
                )
                return
            except (NoRespondersError, NatsTimeout):
                await asyncio.sleep(0.05)


async def test_stop_with_a_full_queue_commits_everything(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    settings = make_settings(batch_size=200, sink_retry_max_s=0.2)
    svc = StoreService(settings)
    await svc.start()
    with locked(db_path):  # commits stall: everything below piles up in the queue
        for i in range(100):
            batch = [trade(symbol=f"S{i}", size=j) for j in range(100)]
            await client.publish("mdp.store.write.trades", json.dumps(batch).encode())
        await until(lambda: svc.queue.depth + svc.batcher.in_flight == 10_000)
        stopping = asyncio.create_task(svc.stop())
        await until(lambda: svc.status is Status.DRAINING)
        assert not stopping.done()
    await asyncio.wait_for(stopping, 30)
    assert svc.status is Status.STOPPED
    assert count(db_path, "trades") == 10_000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_process_cleanly(
    nats_server: NatsServer, tmp_path: Path, sig: signal.Signals
) -> None:
    """A signal commits everything published before it, answers the waiting
    requests, then the process exits 0."""
    db = tmp_path / "store.db"
    proc = start_service(
        nats_server,
        db,
        STORE_BATCH_SIZE="200",
        STORE_SINK_RETRY_MAX_S="0.2",
        STORE_SHUTDOWN_GRACE_S="60",
    )
    nc = OrderedFlushClient()
    await nc.connect(nats_server.url)
    try:
        await wait_until_serving(nc)
        with locked(db):  # commits stall: everything below piles up in the queue
            for i in range(100):
                batch = [trade(symbol=f"S{i}", size=j) for j in range(100)]
                await nc.publish("mdp.store.write.trades", json.dumps(batch).encode())
            await nc.flush()
            # Several write requests stuck behind the lock: each must be answered.
            replies = [
                asyncio.ensure_future(
                    nc.request(
                        "mdp.store.write.trades",
                        json.dumps(trade(symbol=f"R{i}")).encode(),
                        timeout=30,
                    )
                )
                for i in range(5)
            ]
            await nc.flush()
            proc.send_signal(sig)
            await asyncio.sleep(0.5)  # let the stalled flush begin before the lock goes
            assert proc.poll() is None, "the service quit while records were uncommitted"
        rc = await asyncio.to_thread(proc.wait, 60)
        answered = await asyncio.gather(*replies)
    finally:
        await nc.close()
        if proc.poll() is None:
            proc.kill()
    log = Path(f"{db}.log").read_text()
    assert rc == 0, log
    m = re.search(r"store-svc stopped: (\d+) records committed.*\((\d+) received\)", log)
    assert m, log
    # READY, 100 messages of 100 records, and the 5 requests: all of it, exactly once.
    assert (int(m.group(1)), int(m.group(2))) == (10_006, 106), log
    assert count(db, "trades") == 10_006, log
    assert int(re.search(r"flushing (\d+) queued records", log).group(1)) > 0, log  # type: ignore[union-attr]
    assert all(json.loads(a.data)["accepted"] == 1 for a in answered), answered


async def test_grace_period_bounds_shutdown(nats_server: NatsServer, tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    proc = start_service(nats_server, db, STORE_SHUTDOWN_GRACE_S="1.5")
    nc = await nats.connect(nats_server.url)
    try:
        await wait_until_serving(nc)
        with locked(db):
            await nc.publish("mdp.store.write.trades", json.dumps(trade(symbol="X")).encode())
            await nc.flush()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
    finally:
        await nc.close()
        if proc.poll() is None:
            proc.kill()
    log = Path(f"{db}.log").read_text()
    assert rc == 1, log
    assert "grace period" in log
    assert "1 records were not committed" in log


async def test_stop_after_nats_is_gone_still_commits(
    make_settings: Callable[..., Settings], nats_server: NatsServer, db_path: Path
) -> None:
    svc = StoreService(make_settings(shutdown_grace_s=10))
    await svc.start()
    nc = await nats.connect(nats_server.url)
    with locked(db_path):
        await nc.publish(
            "mdp.store.write.trades", json.dumps([trade(size=i) for i in range(50)]).encode()
        )
        await nc.flush()
        await until(lambda: svc.stats.accepted["trades"] == 50)
        await nc.close()
        nats_server.kill()
    await asyncio.wait_for(svc.stop(), 15)
    assert svc.status is Status.STOPPED
    assert count(db_path, "trades") == 50


async def test_a_connection_closed_under_the_service_is_reported_not_ignored(
    make_settings: Callable[..., Settings],
) -> None:
    async with StoreService(make_settings()) as svc:
        assert svc.nc is not None
        await svc.nc.close()  # as nats-py does after a protocol error
        await until(svc.connection_lost.is_set)
    # A normal stop closes the connection too, without reporting it as lost.
    async with StoreService(make_settings()) as svc2:
        pass
    assert not svc2.connection_lost.is_set()


async def test_a_drain_out_of_time_counts_what_intake_still_held(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path, caplog: Any
) -> None:
    """Commits stalled, the queue full, intake waiting for room and more messages held
    in the client: when the grace period cuts the intake's drain short, every message
    it had not queued is counted as dropped, none vanishes."""
    settings = make_settings(
        queue_capacity=100, batch_size=50, shutdown_grace_s=1.0, sink_retry_max_s=0.2
    )
    svc = StoreService(settings)
    await svc.start()
    with locked(db_path):
        for i in range(500):
            await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
        await client.flush()
        intake: Any = svc._intake
        # Queue full, intake waiting for room, the rest held in the client.
        await until(lambda: svc.stats.messages + intake.pending_msgs == 500)
        assert intake.pending_msgs > 0
        with pytest.raises(ShutdownTimeout):  # what was queued is lost (said so, exit 1)
            await svc.stop()
    stats = svc.stats
    assert stats.dropped_messages > 0
    assert stats.accepted["trades"] + stats.dropped_messages == 500
    assert stats.dropped_by_kind["trades"] == stats.dropped_messages
    lines = [r for r in caplog.records if "intake closed during shutdown" in r.getMessage()]
    assert len(lines) == 1, "one line for the whole cut-off, not one per message or group"


async def test_a_control_plane_that_never_stops_does_not_hold_up_shutdown(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The micro service's stop waits on the server (its drains); a hung one is cut
    off within the grace period, and the service still stops."""
    svc = StoreService(make_settings(shutdown_grace_s=2.0))
    await svc.start()
    hung = asyncio.Event()

    async def never() -> None:
        hung.set()
        await asyncio.Event().wait()

    svc.control.stop = never  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(svc.stop(), 10)
    assert hung.is_set()
    assert svc.status is Status.STOPPED
    assert loop.time() - started < 5
    assert any("stopping the control plane took over" in r.getMessage() for r in caplog.records)
