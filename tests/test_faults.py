"""Fault tests of JetStream mode with real processes: the ``store-svc run`` process, a
nats-server with a file store, a real database. Each publishes a known set of records,
injects a fault mid-stream, and checks the store holds every record exactly once.

Counts are printed at the end of the run (see ``pytest_terminal_summary`` in conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from store_svc.devtools.natscluster import NatsCluster
from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.pgserver import PostgresServer

from .conftest import FAULT_REPORT, until_async
from .test_control_plane import gather_replies
from .test_ingest import locked
from .test_jetstream import trades
from .test_shutdown import STORE_SVC

pytestmark = pytest.mark.slow

WRITE = "mdp.store.write.trades"
MESSAGES = 400
PER_MSG = 5


@dataclass
class Rig:
    """A JetStream nats-server, a database, and the store processes under test."""

    tmp: Path
    database_url: str
    nats: NatsServer | NatsCluster  # a cluster's url is its seed URLs, comma-separated
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)  # the pids the test itself ended

    def start_store(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        full = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STORE_")},
            "STORE_NATS_URL": self.nats.url,
            "STORE_DATABASE_URL": self.database_url,
            "STORE_INGEST_MODE": "jetstream",
            "STORE_JS_ACK_WAIT_S": "2",
            "STORE_JS_FETCH_EXPIRES_S": "0.5",
            "STORE_BATCH_SIZE": "50",
            "STORE_SINK_RETRY_MAX_S": "0.5",
            "STORE_COORDINATOR_ID": name,
            **env,
        }
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([STORE_SVC, "run"], env=full, stderr=log)
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """``kill -9`` of a store process, as a fault the test injects."""
        self.killed.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def check_running(self) -> None:
        """Fail at once, showing its log, when a store process has ended that the test
        did not end itself (waiting for its share of the work would only time out)."""
        for proc in self.procs:
            if proc.poll() is not None and proc.pid not in self.killed:
                name = self.names[proc.pid]
                log = (self.tmp / f"{name}.log").read_text(errors="replace")
                raise AssertionError(f"store {name} exited with code {proc.returncode}:\n{log}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def redelivered(self) -> int:
        """Messages the store processes report as redelivered to them (logged at stop)."""
        total = 0
        for log in self.tmp.glob("*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if m := re.search(r"(\d+) redelivered to this instance", line):
                    total += int(m.group(1))
        return total

    async def stored(self) -> list[tuple[str, str]]:
        """The (symbol, ts) of every stored trade, one entry per row."""
        if self.database_url.startswith("sqlite:///"):
            path = self.database_url.removeprefix("sqlite:///")
            if not Path(path).exists():
                return []
            with contextlib.closing(sqlite3.connect(path)) as conn:
                try:
                    rows = conn.execute("SELECT symbol, ts FROM trades").fetchall()
                except sqlite3.OperationalError:  # not created yet
                    return []
            return [(s, str(t)) for s, t in rows]
        try:
            conn = await asyncpg.connect(self.database_url)
        except (OSError, asyncpg.PostgresError):
            return []
        try:
            recs = await conn.fetch("SELECT symbol, ts FROM trades")
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()
        return [(r["symbol"], r["ts"].isoformat()) for r in recs]


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[[str], Rig]]:
    rigs: list[Rig] = []

    def make(database_url: str) -> Rig:
        server = NatsServer(store_dir=tmp_path / "jetstream").start()
        rig = Rig(tmp_path, database_url, server)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop_all()
        rig.nats.stop()


async def connect(url: str) -> NATS:
    """A publisher's connection that rides out a server restart (``url``: one or
    several, comma-separated)."""
    return await nats.connect(
        url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
    )


@contextlib.asynccontextmanager
async def publisher(
    rig: Rig,
    records: list[dict[str, Any]],
    pace: float = 0.004,
    retries: list[int] | None = None,
    slow: asyncio.Event | None = None,
) -> AsyncIterator[asyncio.Task[int]]:
    """Publish ``records`` through JetStream, ``PER_MSG`` per message, each pub-acked,
    ``pace`` seconds apart (0.1 s while ``slow`` is set); a publish that fails (server
    down) is retried with the same message id (each retry is appended to ``retries``)."""
    nc = await connect(rig.nats.url)
    js = nc.jetstream()

    async def run() -> int:
        sent = 0
        for i in range(0, len(records), PER_MSG):
            body = json.dumps(records[i : i + PER_MSG]).encode()
            while True:
                try:
                    await js.publish(WRITE, body, timeout=2, headers={"Nats-Msg-Id": f"m{i}"})
                    break
                except Exception:  # server restarting: retry, deduplicated by message id
                    if retries is not None:
                        retries.append(i)
                    await asyncio.sleep(0.1)
            sent += PER_MSG
            # A steady stream, so faults land mid-stream.
            await asyncio.sleep(0.1 if slow is not None and slow.is_set() else pace)
        return sent

    task = asyncio.create_task(run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await nc.close()


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.1)


async def at_least(rig: Rig, n: int, timeout: float = 60) -> None:
    """Wait until the store holds at least ``n`` rows."""

    async def enough() -> bool:
        rig.check_running()
        return len(await rig.stored()) >= n

    await wait_for(enough, timeout)


async def committed_per_instance(url: str) -> dict[str, int]:
    """Rows committed by each store instance, from ``$SRV.STATS`` (every instance
    answers), keyed by its coordinator id."""
    nc = await connect(url)
    try:
        got = await gather_replies(nc, "$SRV.STATS.market-data-store")
    finally:
        await nc.close()
    return {
        reply["metadata"]["coordinator_id"]: next(
            e["data"]["rows_committed"] for e in reply["endpoints"] if e["name"] == "health"
        )
        for reply in got
    }


async def verify(
    rig: Rig,
    name: str,
    records: list[dict[str, Any]],
    published: int,
    expect_redelivery: bool | None = None,
    extra_messages: int = 0,
) -> None:
    """Wait for the store to settle, stop it, then: every record once, none lost, none
    doubled, every message acked; and the stream took each message once (retried
    publishes deduplicated by ``Nats-Msg-Id``: a row count alone would not show a
    doubled message, since the table's key absorbs it)."""
    want = {(r["symbol"], r["ts"]) for r in records}
    assert published == len(records)

    async def complete() -> bool:
        rig.check_running()
        return len(await rig.stored()) >= len(want)

    await wait_for(complete, 90)
    await asyncio.sleep(1.0)  # anything still redelivered lands now, and would show
    await asyncio.to_thread(rig.stop_all)
    rows = await rig.stored()
    normal = {(s, _iso(t)) for s, t in rows}
    duplicates = len(rows) - len(normal)
    lost = len({(s, _iso(t)) for s, t in want} - normal)
    nc = await connect(rig.nats.url)
    try:
        info = await nc.jetstream().consumer_info("STORE_WRITES", "store")
        stream = await nc.jetstream().stream_info("STORE_WRITES")
    finally:
        await nc.close()
    messages = published // PER_MSG + extra_messages
    redelivered = rig.redelivered()
    FAULT_REPORT.append(
        f"{name}: published {published}, stored {len(rows)}, duplicates {duplicates}, "
        f"lost {lost} (stream messages {stream.state.last_seq} of {messages}; "
        f"redelivered after the fault: {redelivered})"
    )
    if expect_redelivery:
        assert redelivered > 0, "the fault hit messages taken but not yet acked"
    elif expect_redelivery is False:
        assert redelivered == 0, "messages held through the fault were kept alive"
    assert duplicates == 0
    assert lost == 0
    assert len(rows) == len(want)
    assert info.num_ack_pending == 0, "every message acked"
    assert stream.state.last_seq == messages, "each message in the stream once"


def _iso(value: str) -> str:
    # SQLite holds integer microseconds; PostgreSQL and the input ISO text.
    from datetime import UTC, datetime

    if value.lstrip("-").isdigit():
        return datetime.fromtimestamp(int(value) / 1_000_000, UTC).isoformat()
    return datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()


async def test_kill_9_of_the_service_then_a_restart(
    rig_factory: Callable[[str], Rig], tmp_path: Path
) -> None:
    rig = rig_factory(f"sqlite:///{tmp_path}/store.db")
    records = trades(MESSAGES * PER_MSG, symbol="K9")
    first = rig.start_store("first")
    async with publisher(rig, records) as pub:
        await at_least(rig, len(records) // 5)
        with locked(tmp_path / "store.db"):  # commits stall: messages are taken, unacked
            await asyncio.sleep(1.0)
            rig.kill(first)
        rig.start_store("second")
        published = await asyncio.wait_for(pub, 120)
    await verify(rig, "kill -9 of the service", records, published, expect_redelivery=True)


async def test_nats_server_restart_mid_stream(
    rig_factory: Callable[[str], Rig], tmp_path: Path
) -> None:
    rig = rig_factory(f"sqlite:///{tmp_path}/store.db")
    records = trades(MESSAGES * PER_MSG, symbol="NR")
    rig.start_store("only")
    async with publisher(rig, records) as pub:
        await at_least(rig, len(records) // 5)
        port = rig.nats.port
        await asyncio.to_thread(rig.nats.stop)
        await asyncio.sleep(1.0)
        rig.nats.port = port
        await asyncio.to_thread(rig.nats.start)
        published = await asyncio.wait_for(pub, 120)
    await verify(rig, "nats-server restart", records, published)


async def test_database_unavailable_mid_stream(
    rig_factory: Callable[[str], Rig], pg_server: PostgresServer, pg_url: str
) -> None:
    rig = rig_factory(pg_url)
    records = trades(MESSAGES * PER_MSG, symbol="DB")
    rig.start_store("only")
    async with publisher(rig, records) as pub:
        await at_least(rig, len(records) // 5)
        await asyncio.to_thread(pg_server.stop, "immediate")
        await asyncio.sleep(3.0)  # longer than the ack wait: held messages must survive
        await asyncio.to_thread(pg_server.start)
        published = await asyncio.wait_for(pub, 120)
    # Held longer than the ack wait, yet not redelivered: in_progress kept them.
    await verify(rig, "database unavailable", records, published, expect_redelivery=False)


async def test_two_instances_one_killed_mid_stream(
    rig_factory: Callable[[str], Rig], tmp_path: Path
) -> None:
    rig = rig_factory(f"sqlite:///{tmp_path}/store.db")
    records = trades(MESSAGES * PER_MSG, symbol="TWO")
    doomed = rig.start_store("doomed")
    rig.start_store("survivor")

    async def both_at_work() -> bool:
        rig.check_running()
        committed = await committed_per_instance(rig.nats.url)
        return len(committed) == 2 and all(n > 0 for n in committed.values())

    slow = asyncio.Event()
    async with publisher(rig, records, slow=slow) as pub:
        await at_least(rig, len(records) // 5)
        slow.set()  # still at work while both are found sharing the consumer
        await until_async(both_at_work, timeout=20)  # the slowed publisher has 30 s left
        with locked(tmp_path / "store.db"):  # both hold taken, unacked messages
            slow.clear()
            await asyncio.sleep(1.0)
            rig.kill(doomed)
        published = await asyncio.wait_for(pub, 120)
    await verify(rig, "two instances, one killed", records, published, expect_redelivery=True)


async def test_a_poison_message_is_terminated_not_redelivered(
    rig_factory: Callable[[str], Rig], tmp_path: Path
) -> None:
    rig = rig_factory(f"sqlite:///{tmp_path}/store.db")
    records = trades(MESSAGES * PER_MSG, symbol="PO")
    observer = await connect(rig.nats.url)
    dlq: list[Msg] = []

    async def collect(msg: Msg) -> None:
        dlq.append(msg)

    await observer.subscribe("mdp.store.dlq.>", cb=collect)
    await observer.flush()
    rig.start_store("only")
    try:
        async with publisher(rig, records) as pub:
            await at_least(rig, len(records) // 5)
            await observer.jetstream().publish(WRITE, b'[{"symbol": "POISON", "ts": ', timeout=5)
            published = await asyncio.wait_for(pub, 120)
        await verify(rig, "poison message", records, published, extra_messages=1)
        await asyncio.sleep(3.0)  # longer than the ack wait: a redelivery would show
        assert len(dlq) == 1, "on the DLQ once: terminated, not redelivered"
        assert dlq[0].headers is not None
        assert dlq[0].headers["Store-Reject-Reason"] == "malformed_payload"
        assert dlq[0].data == b'[{"symbol": "POISON", "ts": '
    finally:
        await observer.close()
