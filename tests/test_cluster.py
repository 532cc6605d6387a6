"""The store on a three-node NATS cluster (three nats-server processes on loopback).

Connecting with several seed URLs, learning the others, failing over with both
connections; JetStream mode with R3 stream and consumer through leader changes,
kills, a frozen node and a rolling restart; two instances on different nodes; core
mode with retrying request-reply publishers. Each fault test publishes a known set
(JetStream: with ``Nats-Msg-Id``, retried on failure) and checks the database holds
every record exactly once; the counts are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from benchmarks.overload import BURN
from store_svc.devtools.natscluster import NatsCluster
from store_svc.runtime.service import StoreService
from store_svc.settings import load_settings

from .conftest import FAULT_REPORT, until, until_async
from .test_faults import (
    PER_MSG,
    Rig,
    at_least,
    committed_per_instance,
    connect,
    publisher,
    verify,
    wait_for,
)
from .test_jetstream import trades

pytestmark = pytest.mark.slow

STREAM, DURABLE = "STORE_WRITES", "store"
#: Records per fault test: enough that every fault lands mid-stream.
RECORDS = 2000
#: The cluster settings every store process here gets: R3, a fast stale-server check.
CLUSTER_ENV = {
    "STORE_JS_REPLICAS": "3",
    "STORE_NATS_PING_INTERVAL_S": "0.5",
    "STORE_NATS_MAX_OUTSTANDING_PINGS": "2",
}


@contextlib.asynccontextmanager
async def burning(busy: bool) -> AsyncIterator[None]:
    """A second process burning one core while the test runs (when ``busy``)."""
    if not busy:
        yield
        return
    burner = await asyncio.create_subprocess_exec(sys.executable, "-c", BURN, "300")
    try:
        yield
    finally:
        burner.kill()
        await burner.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def rig(cluster: NatsCluster, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, f"sqlite:///{tmp_path}/store.db", cluster)
    yield r
    r.stop_all()


def start_store(rig: Rig, name: str, url: str | None = None, **env: str) -> subprocess.Popen[bytes]:
    extra = {"STORE_NATS_URL": url} if url else {}
    return rig.start_store(name, **CLUSTER_ENV, **extra, **env)


async def health(cluster: NatsCluster) -> dict[str, Any]:
    """The store's health, asked over whichever node answers."""
    nc = await connect(cluster.url)
    try:
        for _ in range(50):
            try:
                msg = await nc.request("mdp.store.health", b"", timeout=1)
                return json.loads(msg.data)  # type: ignore[no-any-return]
            except (NatsTimeout, NoRespondersError):
                await asyncio.sleep(0.2)
    finally:
        await nc.close()
    raise AssertionError("no health answer")


def node_of(cluster: NatsCluster, status: dict[str, Any], role: str = "ingest") -> int:
    """The node a store's connection (``ingest`` or ``control``) is on."""
    details = next(c for c in status["components"] if c["name"] == f"nats-{role}")["details"]
    assert details["cluster"] == cluster.name
    return cluster.index(details["server_name"])


async def leader(cluster: NatsCluster, consumer: bool = False) -> int:
    """The node that leads the stream (or, with ``consumer``, the durable consumer)."""
    nc = await connect(cluster.url)
    try:
        js = nc.jetstream()
        info = await (js.consumer_info(STREAM, DURABLE) if consumer else js.stream_info(STREAM))
    finally:
        await nc.close()
    assert info.cluster is not None
    assert info.cluster.leader is not None
    return cluster.index(info.cluster.leader)


async def new_leader(cluster: NatsCluster, old: int, consumer: bool = False) -> bool:
    """Whether the stream (or the consumer) has a leader other than node ``old``."""
    try:
        return await leader(cluster, consumer) != old
    except Exception:  # no leader while it is elected
        return False


async def stepdown(cluster: NatsCluster, subject: str) -> None:
    nc = await connect(cluster.url)
    try:
        for _ in range(20):
            try:
                reply = json.loads((await nc.request(subject, b"", timeout=2)).data)
            except NatsTimeout:
                continue
            if reply.get("success"):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{subject} did not succeed")
    finally:
        await nc.close()


# --- Connecting ------------------------------------------------------------------


async def test_both_connections_fail_over_to_a_node_learned_from_the_cluster(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    """One seed URL only: the client learns the other two from the cluster and moves
    to one of them, with both connections, when its node dies."""
    settings = load_settings(
        nats_url=cluster.urls[0],
        database_url=f"sqlite:///{tmp_path}/store.db",
        nats_ping_interval_s=0.5,
        nats_max_outstanding_pings=2,
    )
    async with StoreService(settings) as svc, await_connected(cluster) as nc:
        status = svc.snapshot.current()[0].model_dump(mode="json")
        assert node_of(cluster, status, "ingest") == node_of(cluster, status, "control") == 0
        await until(lambda: all(len(c.nc.servers) == 3 for c in svc.view.connections))
        cluster.kill_node(0)

        def moved() -> bool:
            svc.snapshot.refresh()
            status = svc.snapshot.current()[0].model_dump(mode="json")
            return all(
                c["details"]["connected"] == "true" and c["details"]["server_name"] in ("n2", "n3")
                for c in status["components"]
                if c["name"].startswith("nats-")
            )

        await until(moved, timeout=15)
        reply = await nc.request(
            "mdp.store.write.trades", json.dumps(trades(1, symbol="FO")).encode(), timeout=5
        )
        assert json.loads(reply.data)["accepted"] == 1
        health = json.loads((await nc.request("mdp.store.health", b"", timeout=5)).data)
        components = {c["name"]: c for c in health["components"]}
        assert components["nats-ingest"]["details"]["known_servers"] == "3"
        assert int(components["nats-ingest"]["details"]["reconnects"]) >= 1


class await_connected:
    """A test client on the cluster's surviving nodes (an async context manager)."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.cluster = cluster
        self.nc: NATS | None = None

    async def __aenter__(self) -> NATS:
        self.nc = await nats.connect(
            self.cluster.urls[1:], max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        return self.nc

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()


# --- JetStream R3 -----------------------------------------------------------------


async def test_the_stream_and_the_consumer_are_made_r3(rig: Rig, cluster: NatsCluster) -> None:
    start_store(rig, "only")
    nc = await connect(cluster.url)
    try:
        js = nc.jetstream()

        async def made() -> bool:
            try:
                info = await js.consumer_info(STREAM, DURABLE)
            except Exception:
                return False
            return info.cluster is not None and info.cluster.leader is not None

        await wait_for(made, 30)
        stream = await js.stream_info(STREAM)
        consumer = await js.consumer_info(STREAM, DURABLE)
    finally:
        await nc.close()
    assert stream.config.num_replicas == 3
    assert stream.cluster is not None
    assert len(stream.cluster.replicas or []) == 2
    assert consumer.config.num_replicas in (0, 3)  # 0: inherits the stream's three
    assert consumer.cluster is not None
    assert len(consumer.cluster.replicas or []) == 2


def without_a_leader(cluster: NatsCluster) -> None:
    """Stop two of the three nodes, and wait until the one left knows it has no
    JetStream meta leader: from then on its JetStream API requests go unanswered (or
    are told "temporarily unavailable"). A leader left alone steps down only once it
    has lost its quorum, which takes seconds."""
    cluster.stop_node(1)
    cluster.stop_node(2)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            if not (cluster.jsz(0).get("meta_cluster") or {}).get("leader"):
                return
        assert time.monotonic() < deadline, "node 0 still names a meta leader"
        time.sleep(0.1)


ASKING_AGAIN = "asking again for up to"


async def test_start_up_waits_for_a_jetstream_leader(rig: Rig, cluster: NatsCluster) -> None:
    """Two instances starting together, or a cluster electing: JetStream may not
    answer at start-up. The store asks again (up to STORE_NATS_CONNECT_TIMEOUT_S)
    rather than exit, starts once a leader is elected, and stores what is published."""
    await asyncio.to_thread(without_a_leader, cluster)
    proc = start_store(rig, "waiting", url=cluster.urls[0], STORE_NATS_CONNECT_TIMEOUT_S="120")
    log = rig.tmp / "waiting.log"
    await until(lambda: ASKING_AGAIN in log.read_text(), timeout=30)
    await asyncio.sleep(1.0)  # asked more than once, and still there
    assert proc.poll() is None, log.read_text()
    assert "running with JetStream enabled" not in log.read_text()
    for i in (1, 2):
        await asyncio.to_thread(cluster.start_node, i)
    await until(lambda: "JetStream answers after" in log.read_text(), timeout=60)
    records = trades(RECORDS // 4, symbol="WAIT")
    async with publisher(rig, records, pace=0.004) as pub:
        published = await asyncio.wait_for(pub, 120)
    await verify(rig, "cluster: start-up without a JetStream leader", records, published)
    assert log.read_text().count(ASKING_AGAIN) == 1  # logged once


async def test_start_up_gives_up_on_jetstream_after_the_connect_timeout(
    rig: Rig, cluster: NatsCluster
) -> None:
    await asyncio.to_thread(without_a_leader, cluster)
    # 7 s: room to ask again even when the first request times out (5 s).
    proc = start_store(rig, "gives-up", url=cluster.urls[0], STORE_NATS_CONNECT_TIMEOUT_S="7")
    code = await asyncio.to_thread(proc.wait, 60)
    rig.killed.add(proc.pid)  # its exit is what this test wants
    text = (rig.tmp / "gives-up.log").read_text()
    assert code == 1, text
    # Unanswered, or "temporarily unavailable" (10008): never "no JetStream at all".
    assert "did not answer in time" in text or "is not available yet" in text, text
    assert "running with JetStream enabled" not in text, text
    assert ASKING_AGAIN in text, text
    m = re.search(r"gave up after ([\d.]+) s \(STORE_NATS_CONNECT_TIMEOUT_S=7\)", text)
    assert m, text
    assert 6.9 <= float(m.group(1)) <= 7.0 + 2.5, text  # the last request cut to fit


async def test_a_signal_during_the_start_up_wait_stops_the_store(
    rig: Rig, cluster: NatsCluster
) -> None:
    await asyncio.to_thread(without_a_leader, cluster)
    proc = start_store(rig, "stopped", url=cluster.urls[0], STORE_NATS_CONNECT_TIMEOUT_S="300")
    log = rig.tmp / "stopped.log"
    await until(lambda: ASKING_AGAIN in log.read_text(), timeout=30)
    proc.terminate()
    code = await asyncio.to_thread(proc.wait, 30)  # not the 300 s it would wait
    text = log.read_text()
    assert code == 0, text
    assert "signal received during start-up, stopping" in text, text
    assert "Traceback" not in text, text


async def consumer_silent(nc: NATS) -> bool:
    """Whether the consumer's info goes unanswered or "temporarily unavailable" (the
    stream's info is answered even then, with no leader)."""
    try:
        await nc.jetstream(timeout=1).consumer_info(STREAM, DURABLE)
    except (NatsTimeout, APIError):
        return True
    return False


async def silent_twice(nc: NATS) -> bool:
    """Two in a row: one 1 s timeout might be a slow answer."""
    return await consumer_silent(nc) and await consumer_silent(nc)


async def test_a_resume_while_jetstream_has_no_leader_is_answered_503_in_time(
    rig: Rig, cluster: NatsCluster
) -> None:
    """Answered 503 within an operator's `store-svc control` timeout (5 s), intake
    still paused; a resume once a leader is back takes up the stream. (The node left
    alone here mostly answers "temporarily unavailable" at once; where it does not
    answer, each request is cut to 1 s so the reply still comes in time.)"""
    from .test_admin import TOKEN, bearer, control

    start_store(rig, "admin", url=cluster.urls[0], STORE_ADMIN_TOKEN=TOKEN)
    nc = await connect(cluster.urls[0])
    try:
        await until_async(lambda: responding(nc), timeout=30)

        async def acted(action: str) -> bool:  # 503 while starting (or no leader yet)
            result, _ = await control(nc, action, bearer())
            return result.status == "ok"

        await until_async(lambda: acted("pause"), timeout=30)
        await asyncio.to_thread(without_a_leader, cluster)
        # A consumer leader on the node left answers its info requests until it too
        # notices the lost quorum (about 10 s here) and steps down, for good.
        await until_async(lambda: silent_twice(nc), timeout=60)
        result, headers = await control(nc, "resume", bearer())  # 5 s, as the CLI's
        assert headers["Nats-Service-Error-Code"] == "503", result
        assert "Store-Retry-After-Ms" in headers
        assert result.detail.startswith("intake is still paused: JetStream"), result
        for i in (1, 2):
            await asyncio.to_thread(cluster.start_node, i)
        await until_async(lambda: acted("resume"), timeout=60)
    finally:
        await nc.close()
    records = trades(RECORDS // 4, symbol="RESUME")
    async with publisher(rig, records) as pub:
        published = await asyncio.wait_for(pub, 120)
    await verify(
        rig, "cluster: a resume without a JetStream leader, then with one", records, published
    )


async def run_fault(
    rig: Rig,
    name: str,
    fault: Callable[[], Awaitable[str | None]],
    symbol: str,
    seeds: list[str] | None = None,
    want_retries: bool = False,
) -> None:
    """One store (or one per seed URL), a steady JetStream publisher, ``fault`` once a
    fifth is stored and while the publisher is still at work, then every record
    exactly once (and each message once in the stream).

    The publisher slows down while the fault is under way (one message every 0.1 s:
    32 s for the rest), so a slow fault on a busy machine still lands mid-stream.
    """
    records = trades(RECORDS, symbol=symbol)
    for i, seed in enumerate(seeds or [None]):  # type: ignore[list-item]
        start_store(rig, f"store-{i}", url=seed)
    retries: list[int] = []
    slow = asyncio.Event()
    async with publisher(rig, records, pace=0.004, retries=retries, slow=slow) as pub:
        await at_least(rig, len(records) // 5, timeout=90)
        slow.set()
        note = await fault()
        assert not pub.done(), "the fault came and went while the publisher was at work"
        slow.clear()
        published = await asyncio.wait_for(pub, 180)
    if want_retries:
        assert retries, "publishes failed during the fault and were retried"
    detail = ", ".join(x for x in (note, f"{len(retries)} publishes retried") if x)
    await verify(rig, f"{name} ({detail})", records, published)
    for log in rig.tmp.glob("store-*.log"):
        quiet_faults(log.read_text(errors="replace"))


def quiet_faults(text: str) -> None:
    """A leader election or a lost node is logged once each way, not per request:
    each stretch of pull requests unserved (503) or of JetStream unanswered is one
    warning, ended by one line (a stretch may still be open at the stop), a few per
    fault at most; no status line comes four times within a second; no check that timed
    out asks whether the server runs JetStream at all; and nothing is logged as an
    error (a dead pull task, a delivery that failed, a connection fault)."""
    for begin, end in (
        ("find no responder (503)", "are served again"),
        ("JetStream does not answer", "JetStream answers again"),
    ):
        begun, ended = text.count(begin), text.count(end)
        assert begun - ended in (0, 1), text
        assert begun <= 4, text
    ended_at: dict[str, list[datetime]] = {}
    for line in text.splitlines():
        if m := re.match(r"(\S+ \S+) \w+ +\S+: pull request ended: (.*)", line):
            ended_at.setdefault(m.group(2), []).append(
                datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            )
    for status, times in ended_at.items():
        # One per open request at most (a leadership change ends each of them).
        burst = [(b - a).total_seconds() for a, b in zip(times, times[3:], strict=False)]
        assert all(gap >= 1.0 for gap in burst), (status, times)
    assert "running with JetStream enabled" not in text, text
    assert " ERROR " not in text, text  # none in any cluster fault run so far


async def on_one_node(cluster: NatsCluster, node: int) -> None:
    """Wait until the store answers health with both connections on ``node``."""
    status = await health(cluster)
    assert node_of(cluster, status, "ingest") == node_of(cluster, status, "control") == node


async def test_kill_9_of_the_stream_leader(rig: Rig, cluster: NatsCluster) -> None:
    async def fault() -> None:
        old = await leader(cluster)
        cluster.kill_node(old)
        await until_async(lambda: new_leader(cluster, old), timeout=20)
        await asyncio.to_thread(cluster.start_node, old)
        await until_async(lambda: replicas_current(cluster), timeout=60)  # it rejoined

    await run_fault(rig, "cluster: kill -9 of the stream leader", fault, "CL1", want_retries=True)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "a-core-busy"])
async def test_kill_9_of_the_node_the_service_is_on(
    rig: Rig, cluster: NatsCluster, busy: bool
) -> None:
    """The store is given one seed, so both its connections are on that node; the
    other two it learns from the cluster, and both connections move there."""

    async def fault() -> str:
        await on_one_node(cluster, 1)
        started = time.monotonic()
        cluster.kill_node(1)
        await until_async(lambda: moved_off(cluster, 1), timeout=20)
        return f"both connections moved in {time.monotonic() - started:.1f} s"

    name = "cluster: kill -9 of the service's node" + (", a core busy" if busy else "")
    async with burning(busy):
        await run_fault(rig, name, fault, "CL2", seeds=[cluster.urls[1]])


async def moved_off(cluster: NatsCluster, node: int) -> bool:
    status = await health(cluster)
    return all(
        c["details"]["connected"] == "true" and cluster.index(c["details"]["server_name"]) != node
        for c in status["components"]
        if c["name"].startswith("nats-")
    )


async def waiting_for_jetstream(cluster: NatsCluster) -> bool:
    """The store's intake shows, degraded, that JetStream does not serve its pull
    requests or answer its checks."""
    status = await health(cluster)
    (intake,) = [c for c in status["components"] if c["name"] == "intake"]
    details = intake["details"]
    stalled = "jetstream_unanswered_s" in details or "jetstream_unserved_s" in details
    return intake["state"] == "degraded" and stalled


async def test_kill_9_of_the_consumer_leader(rig: Rig, cluster: NatsCluster) -> None:
    """Until a new consumer leader is elected (4-6 s measured) pull requests find no
    one: health shows the intake degraded, and it is logged once each way."""

    async def fault() -> str:
        old = await leader(cluster, consumer=True)
        killed = time.monotonic()
        cluster.kill_node(old)
        await until_async(lambda: waiting_for_jetstream(cluster), timeout=20)
        await until_async(lambda: new_leader(cluster, old, consumer=True), timeout=20)
        elected = time.monotonic() - killed

        async def pulling_again() -> bool:
            return not await waiting_for_jetstream(cluster)

        await until_async(pulling_again, timeout=20)
        await asyncio.to_thread(cluster.start_node, old)
        await until_async(lambda: replicas_current(cluster), timeout=60)  # it rejoined
        return f"new leader in {elected:.1f} s"

    await run_fault(rig, "cluster: kill -9 of the consumer leader", fault, "CL7")
    (log,) = rig.tmp.glob("store-*.log")
    text = log.read_text(errors="replace")
    assert "find no responder (503)" in text
    assert text.count("find no responder (503)") == text.count("are served again")


async def test_stream_and_consumer_leader_stepdowns(rig: Rig, cluster: NatsCluster) -> None:
    async def fault() -> str:
        stream_before = await leader(cluster)
        consumer_before = await leader(cluster, consumer=True)
        await stepdown(cluster, f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}")
        await until_async(lambda: new_leader(cluster, stream_before), timeout=20)
        await stepdown(cluster, f"$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM}.{DURABLE}")
        await until_async(lambda: new_leader(cluster, consumer_before, consumer=True), timeout=20)
        return "both leaders changed"

    await run_fault(rig, "cluster: stream and consumer leader stepdowns", fault, "CL3")


async def replicas_current(cluster: NatsCluster) -> bool:
    """Whether the stream and the consumer have a leader and every replica is current."""
    nc = await connect(cluster.url)
    try:
        js = nc.jetstream()
        infos = [await js.stream_info(STREAM), await js.consumer_info(STREAM, DURABLE)]
    except Exception:
        return False
    finally:
        await nc.close()
    return all(
        i.cluster is not None
        and i.cluster.leader is not None
        and len(i.cluster.replicas or []) == 2
        and all(r.current for r in i.cluster.replicas or [])
        for i in infos
    )


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "a-core-busy"])
async def test_a_rolling_restart_of_all_three_nodes(
    rig: Rig, cluster: NatsCluster, busy: bool
) -> None:
    """Each node in turn: stopped, started, and the next one only once the stream
    and the consumer are whole again (as an operator's rolling restart would)."""

    async def fault() -> str:
        started = time.monotonic()
        for i in range(3):
            await asyncio.to_thread(cluster.stop_node, i)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster.start_node, i)
            await until_async(lambda: replicas_current(cluster), timeout=60)
        return f"three restarts in {time.monotonic() - started:.1f} s"

    name = "cluster: rolling restart of three nodes" + (", a core busy" if busy else "")
    async with burning(busy):
        # Paced so the publisher is still at work after the third restart.
        await run_fault(rig, name, fault, "CL4")


async def test_a_node_frozen_longer_than_the_ack_wait(rig: Rig, cluster: NatsCluster) -> None:
    async def fault() -> str:
        await on_one_node(cluster, 2)
        started = time.monotonic()
        cluster.freeze_node(2)
        try:
            # Nothing resets the socket: the stale-server check (PINGs every 0.5 s
            # here, 2 unanswered) moves both connections.
            await until_async(lambda: moved_off(cluster, 2), timeout=30)
            moved = time.monotonic() - started
            await asyncio.sleep(3.0)  # frozen for longer than the ack wait (2 s) in all
        finally:
            cluster.thaw_node(2)
        return f"both connections moved in {moved:.1f} s"

    await run_fault(
        rig,
        "cluster: the service's node frozen past the ack wait",
        fault,
        "CL5",
        seeds=[cluster.urls[2]],
    )


async def test_two_instances_on_different_nodes_share_the_consumer(
    rig: Rig, cluster: NatsCluster
) -> None:
    async def both_at_work() -> bool:
        rig.check_running()
        committed = await committed_per_instance(cluster.url)
        return len(committed) == 2 and all(n > 0 for n in committed.values())

    async def fault() -> None:
        # Both have stored some of the stream before the fault: they share the one
        # durable consumer (the publisher is slowed while this waits).
        await until_async(both_at_work, timeout=20)
        cluster.kill_node(0)  # store-0's only seed: it moves to a node it learned of

    seeds = cluster.urls[:2]
    await run_fault(rig, "cluster: two instances, one's node killed", fault, "CL6", seeds)
    acked = {}
    for log in rig.tmp.glob("store-*.log"):
        m = re.search(r"JetStream: (\d+) messages acked", log.read_text(errors="replace"))
        assert m, log
        acked[log.stem] = int(m.group(1))
    assert len(acked) == 2
    assert all(n > 0 for n in acked.values()), acked


# --- Core mode --------------------------------------------------------------------


async def test_core_mode_acknowledged_writes_survive_the_loss_of_the_services_node(
    rig: Rig, cluster: NatsCluster
) -> None:
    """Request-reply writes retried until answered; the node the service is on dies."""
    start_store(rig, "core", url=cluster.urls[0], STORE_INGEST_MODE="core")
    records = trades(RECORDS // 2, symbol="CORE")
    nc = await connect(cluster.url)
    acked: list[dict[str, Any]] = []
    attempts = 0
    try:
        await until_async(lambda: responding(nc), timeout=30)

        async def send_all() -> None:
            nonlocal attempts
            for i in range(0, len(records), PER_MSG):
                body = json.dumps(records[i : i + PER_MSG]).encode()
                while True:
                    attempts += 1
                    try:
                        reply = await nc.request("mdp.store.write.trades", body, timeout=2)
                    except (NatsTimeout, NoRespondersError):
                        await asyncio.sleep(0.1)
                        continue
                    if json.loads(reply.data).get("accepted") == PER_MSG:
                        acked.extend(records[i : i + PER_MSG])
                        break
                    await asyncio.sleep(0.1)  # refused (503 while draining): again

        sender = asyncio.create_task(send_all())
        await until(lambda: len(acked) >= len(records) // 5, timeout=60)
        await on_one_node(cluster, 0)  # its one seed: both connections are there
        assert not sender.done()
        cluster.kill_node(0)
        await asyncio.wait_for(sender, 120)
    finally:
        await nc.close()
    rig.stop_all()
    rows = await rig.stored()
    unique = set(rows)
    want = {(r["symbol"], r["ts"]) for r in acked}
    from .test_faults import _iso

    stored = {(s, _iso(t)) for s, t in unique}
    lost = len({(s, _iso(t)) for s, t in want} - stored)
    FAULT_REPORT.append(
        f"cluster, core mode: acknowledged {len(acked)} (in {attempts} attempts), stored "
        f"{len(rows)}, duplicates {len(rows) - len(unique)}, lost {lost}"
    )
    assert len(acked) == len(records)
    assert attempts > len(records) // PER_MSG, "writes sent into the lost node were retried"
    assert len(rows) == len(unique) == len(records)
    assert lost == 0


async def responding(nc: NATS) -> bool:
    try:
        await nc.request("mdp.store.ready", b"", timeout=1)
    except (NatsTimeout, NoRespondersError):
        return False
    return True
