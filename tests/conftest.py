"""Shared fixtures: a real nats-server per test on a random port, SQLite under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from store_svc.bus.client import OrderedFlushClient
from store_svc.core import FeedbackEvent
from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.pgserver import PostgresServer
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings

from .redis_server import RedisServer, find_redis_server


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's STORE_* variables out of every test."""
    for name in list(os.environ):
        if name.startswith("STORE_") or name == "ADMIN_TOKEN":
            monkeypatch.delenv(name)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A private nats-server on a random loopback port."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a random loopback port (skips where none is installed)."""
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (machine's initdb/pg_ctl)."""
    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture
async def pg_url(pg_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database on the session's PostgreSQL server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server.dsn)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    yield pg_server.url(name)
    conn = await asyncpg.connect(pg_server.dsn)
    await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against both sinks, so they stay equivalent."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(
    make_settings: Callable[..., Settings], database_url: str
) -> AsyncIterator[StoreService]:
    """A running service on each sink in turn."""
    async with StoreService(make_settings(database_url=database_url)) as svc:
        yield svc


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def make_settings(nats_server: NatsServer, db_path: Path) -> Callable[..., Settings]:
    """Settings pointing at the test's nats-server and SQLite file, with overrides."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_url": nats_server.url,
            "database_url": f"sqlite:///{db_path}",
            "shutdown_grace_s": 10.0,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
async def service(make_settings: Callable[..., Settings]) -> AsyncIterator[StoreService]:
    """A running service with default settings."""
    async with StoreService(make_settings()) as svc:
        yield svc


def checked(msg: Msg) -> FeedbackEvent:
    """Decode a feedback message with Core's model and check it is Core's own JSON,
    with the schema headers."""
    event = FeedbackEvent.model_validate_json(msg.data)
    assert msg.data == event.model_dump_json().encode()
    assert msg.headers == {"Md-Schema-Id": "telemetry.FeedbackEvent", "Md-Schema-Track": "v1"}
    assert event.source == "store"
    return event


@pytest.fixture
async def feedback(client: NATS) -> AsyncIterator[list[FeedbackEvent]]:
    """Every feedback event published on ``mdp.telemetry.feedback`` while the test runs."""
    events: list[FeedbackEvent] = []

    async def collect(msg: Msg) -> None:
        events.append(checked(msg))

    sub = await client.subscribe("mdp.telemetry.feedback", cb=collect)
    await client.flush()
    yield events
    await sub.unsubscribe()


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[NATS]:
    """A NATS client for the test itself (publisher / observer); its flush() is ordered."""
    nc = OrderedFlushClient()
    await nc.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client of the test's nats-server (see :func:`connected`)."""
    async with connected(nats_server.url) as nc:
        yield nc


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def until_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Like :func:`until` for an async predicate."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


#: Fixtures that start a server or a service: a ``logic`` test must use none of them.
_REAL_FIXTURES = {
    "nats_server",
    "redis_server",
    "pg_server",
    "pg_url",
    "database_url",
    "store",
    "make_settings",
    "service",
    "client",
}


@pytest.fixture(autouse=True)
def _logic_starts_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``logic`` test that starts a child process (a server, a SQLite worker) fails."""
    if request.node.get_closest_marker("logic") is None:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a logic test started a process; drop the logic marker")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the ``logic`` tier honest: in-memory tests start no server."""
    for item in items:
        if item.get_closest_marker("logic") is None:
            continue
        used = _REAL_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(f"{item.nodeid} is marked logic but uses {sorted(used)}")


#: Lines the fault tests report (published, stored, duplicates, lost), printed at the end.
FAULT_REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault tests' counts, so CI output shows them."""
    if FAULT_REPORT:
        terminalreporter.section("fault tests: records published / stored / duplicates / lost")
        for line in FAULT_REPORT:
            terminalreporter.write_line(line)
