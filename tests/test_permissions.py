"""Least privilege: the store runs against ``deploy/nats-server.conf`` itself, where
its user has exactly the documented permissions, in core and JetStream mode (and the
narrower JetStream set with ``STORE_JS_CREATE`` off); the whole path works with
nothing refused. Each documented permission, taken away in turn, is missed: the
refusal is counted, named and shows in health (or ends a JetStream start-up with
its name). A permission revoked while running (a reloaded server configuration) is
seen the same way, and a revoked user ends the service within the connect timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from store_svc.bus import connection
from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.errors import JetStreamUnavailable
from store_svc.runtime.service import StoreService
from store_svc.settings import load_settings

from .conftest import until

pytestmark = pytest.mark.slow

STORE_SVC = str(Path(sys.executable).parent / "store-svc")

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats-server.conf"
PASSWORDS = {
    "STORE_PASS": "store-pw-41",
    "PUBLISHER_PASS": "publisher-pw-42",
    "PIPELINE_PASS": "pipeline-pw-43",
    "OPERATOR_PASS": "operator-pw-44",
}
TOKEN = "admin-token-for-the-test"


ADMIN = '{ user: "admin", password: "admin-pw-45" }'  # test only: sets up streams


def _server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str) -> NatsServer:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)  # the config reads them; nats-server inherits
    path = tmp_path / "server.conf"
    path.write_text(conf)
    return NatsServer(store_dir=tmp_path / "js", extra_args=("-c", str(path)))


def _reload(server: NatsServer, tmp_path: Path, conf: str) -> None:
    """Give the running server ``conf`` (what an operator's ``nats-server --signal
    reload`` does)."""
    (tmp_path / "server.conf").write_text(conf)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)


def _reloaded(server: NatsServer, times: int) -> bool:
    return b"".join(server.log).count(b"Reloaded server configuration") >= times


# --- the documented configuration, read as data ----------------------------------


def _block(conf: str, name: str) -> str:
    """The text of the top-level variable ``name = { ... }``."""
    m = re.search(rf"^{name} = \{{\n(.*?)^\}}\n", conf, re.S | re.M)
    assert m, name
    return m.group(1)


def _allowed(block: str, direction: str) -> list[str]:
    """The subjects a block allows for ``publish`` or ``subscribe``, comments left out."""
    text = re.sub(r"#[^\n]*", "", block)
    m = re.search(rf"{direction}: \{{\s*allow: \[(.*?)\]", text, re.S)
    assert m, direction
    return re.findall(r'"([^"]+)"', m.group(1))


def _without(conf: str, name: str, direction: str, subject: str) -> str:
    """``conf`` where block ``name`` no longer allows ``subject`` (or, for direction
    ``responses``, replies to the requests it receives)."""
    block = _block(conf, name)
    if direction == "responses":
        smaller = block.replace("allow_responses: true", "allow_responses: false")
    else:
        part = re.search(rf"{direction}: \{{.*?\]", block, re.S)
        assert part
        cut = re.sub(rf'\s*"{re.escape(subject)}",?', "", part.group(0), count=1)
        smaller = block.replace(part.group(0), cut)
    assert smaller != block
    return conf.replace(block, smaller)


def _covers(pattern: str, subject: str) -> bool:
    """Whether the NATS ``pattern`` covers ``subject`` (itself possibly a wildcard),
    ignoring case: nats-py hands the server's refusals over in lower case."""
    want, have = pattern.lower().split("."), subject.lower().split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)


_MODES = {"core": "STORE_CORE", "jetstream": "STORE_JETSTREAM"}


def _documented() -> list[tuple[str, str, str]]:
    conf = CONF.read_text()
    cases = [
        (mode, direction, subject)
        for mode, name in _MODES.items()
        for direction in ("publish", "subscribe")
        for subject in _allowed(_block(conf, name), direction)
    ]
    return cases + [(mode, "responses", "_INBOX.>") for mode in _MODES]


def test_the_operations_table_and_the_configuration_agree() -> None:
    """Each subject of the store's blocks is in the table's row and column for its
    mode and direction, and each subject the table names is in that block."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    section = docs[docs.index("### Least privilege") : docs.index("## Scaling out")]
    table = section[section.index("| the store's user |") : section.index("| other roles |")]
    cells = {
        row[0]: row[1:3]
        for line in table.splitlines()[2:]
        if (row := [c.strip() for c in line.strip().strip("|").split("|")])[0]
    }
    rows = {
        "core": ["both modes", "core mode"],
        "jetstream": ["both modes", "JetStream mode", "JetStream with `STORE_JS_CREATE=true`"],
    }
    conf = CONF.read_text()
    for mode, name in _MODES.items():
        for column, direction in enumerate(("publish", "subscribe")):
            text = " ".join(cells[label][column] for label in rows[mode])
            documented = {t for t in re.findall(r"`([^`\s=]+)`", text) if "." in t}
            assert documented == set(_allowed(_block(conf, name), direction)), (mode, direction)
    assert "allow_responses: true" in cells["both modes"][0]


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """A nats-server running the documented configuration."""
    with _server(tmp_path, monkeypatch, CONF.read_text()) as server:
        yield server


async def _as(server: NatsServer, user: str) -> NATS:
    password = PASSWORDS.get(f"{user.upper()}_PASS", "admin-pw-45")
    return await nats.connect(server.url, user=user, password=password)


@pytest.fixture
async def users(locked: NatsServer) -> AsyncIterator[dict[str, NATS]]:
    clients = {u: await _as(locked, u) for u in ("publisher", "pipeline", "operator")}
    yield clients
    for nc in clients.values():
        await nc.close()


def _store(server: NatsServer, tmp_path: Path, mode: str, **extra: Any) -> StoreService:
    return StoreService(
        load_settings(
            nats_url=server.url,
            nats_user="store" if mode == "core" else "store-js",
            nats_password=PASSWORDS["STORE_PASS"],
            nats_inbox_prefix="_INBOX_store",
            ingest_mode=mode,
            database_url=f"sqlite:///{tmp_path}/store.db",
            admin_token=TOKEN,
            feedback_heartbeat_s=0.5,
            **extra,
        )
    )


def _trade(symbol: str, n: int = 0) -> bytes:
    return json.dumps(
        {"symbol": symbol, "ts": 1_700_000_000 + n, "price": "1.5", "size": 1}
    ).encode()


def _keeper(into: list[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def keep(msg: Msg) -> None:
        into.append(msg)

    return keep


async def _walk(svc: StoreService, mode: str, users: dict[str, NATS], server: NatsServer) -> None:
    """The whole path, each step checked: writes, DLQ, feedback, health, readiness,
    ``$SRV``, control with audit, query and latest; nothing refused."""
    publisher, pipeline, operator = users["publisher"], users["pipeline"], users["operator"]
    feedback: list[Msg] = []
    dlq: list[Msg] = []
    audit: list[Msg] = []
    await pipeline.subscribe("mdp.telemetry.feedback", cb=_keeper(feedback))
    await operator.subscribe("mdp.store.dlq.>", cb=_keeper(dlq))
    await operator.subscribe("mdp.telemetry.audit", cb=_keeper(audit))
    await operator.flush()
    await pipeline.flush()
    if mode == "core":
        reply = await publisher.request("mdp.store.write.trades", _trade("OK"), timeout=10)
        assert json.loads(reply.data)["accepted"] == 1
        await publisher.publish("mdp.store.write.trades", b'{"symbol": "BAD"}')
    else:
        js = publisher.jetstream()
        await js.publish("mdp.store.write.trades", _trade("OK"))
        await js.publish("mdp.store.write.trades", b'{"symbol": "BAD"}')
    await until(lambda: svc.stats.committed_total == 1 and len(dlq) == 1)
    await until(lambda: len(feedback) >= 1)

    health = await operator.request("mdp.store.health", b"", timeout=10)
    assert HealthStatus.model_validate_json(health.data).state == "healthy"
    ready = await operator.request("mdp.store.ready", b"", timeout=10)
    assert "Nats-Service-Error-Code" not in (ready.headers or {})
    ping = await operator.request("$SRV.PING.market-data-store", b"", timeout=10)
    assert json.loads(ping.data)["name"] == "market-data-store"
    stats = await operator.request("$SRV.STATS.market-data-store", b"", timeout=10)
    assert json.loads(stats.data)["endpoints"]
    result = await operator.request(
        "mdp.store.control.reload", b"", timeout=10,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert json.loads(result.data)["status"] == "ok"
    page = await operator.request("mdp.store.query.trades", b'{"symbol": "OK"}', timeout=10)
    assert [r["symbol"] for r in json.loads(page.data)["records"]] == ["OK"]
    latest = await operator.request("mdp.store.latest.trades", b'{"symbol": "OK"}', timeout=10)
    assert len(json.loads(latest.data)["records"]) == 1
    await until(lambda: len(audit) == 1)
    for command in ("health", "ready"):  # the container health check, as the store
        code, said = await _health_check(server, mode, command)
        assert code == 0, said
    # The operator's commands, under the operator's user (default inbox prefix).
    operator_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STORE_")},
        "STORE_NATS_URL": server.url,
        "STORE_NATS_USER": "operator",
        "STORE_NATS_PASSWORD": PASSWORDS["OPERATOR_PASS"],
        "STORE_ADMIN_TOKEN": TOKEN,
    }
    for args in (("control", "reload"), ("query", "trades", "OK"), ("health",)):
        proc = await asyncio.create_subprocess_exec(
            STORE_SVC, *args, env=operator_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (args, err)
        assert b"OK" in out or args[0] != "query", out
    await until(lambda: len(audit) == 2)  # the command's reload is audited too
    # Nothing the store did was refused: no denial counted, none in the server log.
    assert [c.permission_denials for c in (svc.ingest_nats, svc.control_nats)] == [0, 0]
    log = b"".join(server.log).decode(errors="replace")
    assert not re.search(r"store.*Permissions Violation", log), log[-2000:]


# --- the documented permissions are enough --------------------------------------


@pytest.mark.parametrize("mode", ["core", "jetstream"])
async def test_the_whole_path_works_with_only_the_documented_permissions(
    mode: str, locked: NatsServer, users: dict[str, NATS], tmp_path: Path
) -> None:
    async with _store(locked, tmp_path, mode) as svc:
        await _walk(svc, mode, users, locked)


async def test_jetstream_without_create_needs_no_create_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``STORE_JS_CREATE=false`` an administrator makes the stream and the
    consumer (the commands in docs/operations.md); the store's user then needs
    neither ``$JS.API.STREAM.CREATE`` nor ``$JS.API.CONSUMER.DURABLE.CREATE``."""
    conf = CONF.read_text()
    for subject in (
        "$JS.API.STREAM.CREATE.STORE_WRITES",
        "$JS.API.CONSUMER.DURABLE.CREATE.STORE_WRITES.store",
    ):
        conf = _without(conf, "STORE_JETSTREAM", "publish", subject)
    conf = conf.replace("users = [", f"users = [\n    {ADMIN}", 1)
    with _server(tmp_path, monkeypatch, conf) as server:
        admin = await _as(server, "admin")
        js = admin.jetstream()
        await js.add_stream(name="STORE_WRITES", subjects=["mdp.store.write.>"])
        await js.add_consumer(
            "STORE_WRITES",
            durable_name="store",
            ack_policy="explicit",
            filter_subject="mdp.store.write.>",
            ack_wait=30,
            max_ack_pending=20_000,
        )
        await admin.close()
        clients = {u: await _as(server, u) for u in ("publisher", "pipeline", "operator")}
        try:
            async with _store(server, tmp_path, "jetstream", js_create=False) as svc:
                await _walk(svc, "jetstream", clients, server)
        finally:
            for nc in clients.values():
                await nc.close()


# --- each documented permission is needed, and its absence is seen ----------------


@contextlib.contextmanager
def _db_locked(db: Path) -> Iterator[None]:
    """Hold the SQLite file's write lock, as a stuck writer would."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def _try(coro: Awaitable[Any]) -> None:
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await coro


def _store_env(server: NatsServer, mode: str) -> dict[str, str]:
    """The store's settings as its container health check gets them."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("STORE_")},
        "STORE_NATS_URL": server.url,
        "STORE_NATS_USER": "store" if mode == "core" else "store-js",
        "STORE_NATS_PASSWORD": PASSWORDS["STORE_PASS"],
        "STORE_NATS_INBOX_PREFIX": "_INBOX_store",
    }


async def _health_check(server: NatsServer, mode: str, command: str) -> tuple[int, str]:
    """``store-svc health`` or ``ready`` with the store's own settings (the container
    health check of docker-compose.yml and the Dockerfile): exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        STORE_SVC,
        command,
        "--timeout",
        "2",
        env=_store_env(server, mode),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        # Never leave it behind (a child left running holds the loop's shutdown).
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"store-svc {command} did not exit in 60 s: {err.decode()}") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def _exercise(mode: str, server: NatsServer, stall: Path | None = None) -> list[str]:
    """Everything that makes the store use its permissions, each step allowed to fail;
    returns what the store's health checks printed.

    With ``stall`` (the database file), commits are held up for longer than half the
    ack wait while the writes arrive, so that JetStream messages are kept alive with
    ``in_progress`` before their ack: a second reply to one message."""
    clients = {u: await _as(server, u) for u in ("publisher", "operator")}
    publisher, operator = clients["publisher"], clients["operator"]
    release = asyncio.Event()
    held = None
    if stall is not None:
        loop = asyncio.get_running_loop()
        taken = asyncio.Event()

        def hold() -> None:
            with _db_locked(stall):
                loop.call_soon_threadsafe(taken.set)
                asyncio.run_coroutine_threadsafe(release.wait(), loop).result()

        held = asyncio.ensure_future(asyncio.to_thread(hold))
        await taken.wait()
    try:
        if mode == "core":
            await _try(publisher.request("mdp.store.write.trades", _trade("OK"), timeout=1))
            await publisher.publish("mdp.store.write.trades", b'{"symbol": "BAD"}')
        else:
            js = publisher.jetstream()
            await _try(js.publish("mdp.store.write.trades", _trade("OK"), timeout=2))
            await _try(js.publish("mdp.store.write.trades", b'{"symbol": "BAD"}', timeout=2))
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        asks = [
            ("mdp.store.health", b"", None),
            ("mdp.store.ready", b"", None),
            ("$SRV.PING.market-data-store", b"", None),
            ("mdp.store.control.reload", b"", bearer),
            ("mdp.store.query.trades", b'{"symbol": "OK"}', None),
            ("mdp.store.latest.trades", b'{"symbol": "OK"}', None),
        ]
        checks = [_health_check(server, mode, c) for c in ("health", "ready")]
        *_, said_health, said_ready = await asyncio.gather(
            *(_try(operator.request(s, b, timeout=1, headers=h)) for s, b, h in asks),
            *checks,
        )
        if held is not None:
            await asyncio.sleep(2.0)  # > half of the 2 s ack wait: in_progress goes out
    finally:
        release.set()
        if held is not None:
            await held
        for nc in clients.values():
            await nc.close()
    return [said_health[1], said_ready[1]]


def _explains(text: str, direction: str, pattern: str) -> bool:
    """Whether the refusal ``text`` is one the missing permission explains."""
    word = "subscription" if direction == "subscribe" else "publish"
    m = re.search(rf'for {word} to "([^"]+)"', text)
    return bool(m) and _covers(pattern, m.group(1) if m else "")


def _refused(svc: StoreService, direction: str, pattern: str) -> list[str]:
    """The store's connections with a refusal the missing permission explains."""
    return [
        conn.role
        for conn in (svc.ingest_nats, svc.control_nats)
        for text in conn.refusals
        if _explains(text, direction, pattern)
    ]


@pytest.mark.parametrize(("mode", "direction", "subject"), _documented())
async def test_each_documented_permission_is_missed_when_taken_away(
    mode: str,
    direction: str,
    subject: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conf = _without(CONF.read_text(), _MODES[mode], direction, subject)
    # An ack alone passes as the one reply allow_responses grants a delivered
    # message; the ack after an in_progress is the second, and needs $JS.ACK.
    stall = tmp_path / "store.db" if subject.startswith("$JS.ACK.") else None
    with _server(tmp_path, monkeypatch, conf) as server:
        svc = _store(server, tmp_path, mode, js_ack_wait_s=2.0)
        failure = ""
        try:
            await svc.start()
        except JetStreamUnavailable as exc:
            failure = str(exc)
        if failure:
            # Set-up the server refused: the start-up error names it.
            assert mode == "jetstream", failure
            m = re.search(r'to "([^"]+)"', failure)
            assert m, failure
            assert _covers(subject, m.group(1)), failure
            return
        try:
            said = await _exercise(mode, server, stall)
            # The health checks' own subjects are refused to the command, which says so.
            told = [t for t in said if _explains(t.lower(), direction, subject)]
            if told:
                assert "the server refused this user" in told[0], told[0]
                return
            await until(lambda: bool(_refused(svc, direction, subject)))
            for role in _refused(svc, direction, subject):
                conn = svc.ingest_nats if role == "ingest" else svc.control_nats
                assert conn.component().state == "degraded"
                assert conn.component().details["permission_denials"] != "0"
        finally:
            await svc.stop()


# --- taken away while running -----------------------------------------------------


async def test_a_permission_taken_away_is_counted_logged_once_and_shown(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The documented configuration without the store's right to publish to the DLQ.
    conf = CONF.read_text().replace('"mdp.store.dlq.>",          # rejected records', "", 1)
    assert conf != CONF.read_text()
    with _server(tmp_path, monkeypatch, conf) as server:
        publisher = await _as(server, "publisher")
        try:
            async with _store(server, tmp_path, "core") as svc:
                for _ in range(3):
                    await publisher.publish("mdp.store.write.trades", b'{"symbol": "BAD"}')
                reply = await publisher.request("mdp.store.write.trades", _trade("OK"), timeout=10)
                assert json.loads(reply.data)["accepted"] == 1  # the rest goes on
                await until(lambda: svc.ingest_nats.permission_denials == 3)
                component = svc.ingest_nats.component()
                assert component.state == "degraded"
                assert "mdp.store.dlq.trades" in component.details["last_permission_denied"]
                operator = await _as(server, "operator")
                health = await operator.request("mdp.store.health", b"", timeout=10)
                await operator.close()
                assert HealthStatus.model_validate_json(health.data).state == "degraded"
                assert svc.control_nats.permission_denials == 0
        finally:
            await publisher.close()
    assert caplog.text.count("the server refused a subject") == 1


async def test_a_permission_revoked_while_running_is_seen_and_mended(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(connection, "DENIAL_HOLD_S", 1.0)  # a refused publish's hold
    base = CONF.read_text()
    with _server(tmp_path, monkeypatch, base) as server:
        operator = await _as(server, "operator")
        try:
            async with _store(server, tmp_path, "core") as svc:
                control = svc.control_nats
                # An operator reloads the server with the feedback right and the health
                # subscription gone: the server drops the subscription and refuses
                # every heartbeat from then on.
                smaller = _without(base, "STORE_CORE", "publish", "mdp.telemetry.feedback")
                smaller = _without(smaller, "STORE_CORE", "subscribe", "mdp.store.health")
                _reload(server, tmp_path, smaller)
                await until(
                    lambda: (
                        bool(_refused(svc, "publish", "mdp.telemetry.feedback"))
                        and bool(_refused(svc, "subscribe", "mdp.store.health"))
                    )
                )
                assert control.component().state == "degraded"
                with pytest.raises(nats.errors.NoRespondersError):
                    await operator.request("mdp.store.health", b"", timeout=5)
                denials = control.permission_denials
                await until(lambda: control.permission_denials >= denials + 2)  # heartbeats

                # Given back: publishes pass again at once; the dropped subscription is
                # made again by the next reconnect (here forced; a restart does too).
                _reload(server, tmp_path, base)
                await until(lambda: _reloaded(server, 2))
                assert control.component().state == "degraded"
                await control.nc.force_reconnect()
                await until(lambda: control.component().state == "healthy")
                health = await operator.request("mdp.store.health", b"", timeout=10)
                assert HealthStatus.model_validate_json(health.data).state == "healthy"
        finally:
            await operator.close()
    # Each refused subject is logged once, however often it was refused.
    assert caplog.text.count('for publish to "mdp.telemetry.feedback"') == 1
    assert caplog.text.count('for subscription to "mdp.store.health"') == 1


async def test_a_user_revoked_while_running_ends_the_service_within_the_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reloaded without the store's user: every reconnect is refused, so
    ``store-svc run`` gives up after ``STORE_NATS_CONNECT_TIMEOUT_S`` with exit 1 and
    lines naming authorization (not a retry loop that hides it), and what it had
    acknowledged is stored."""
    base = CONF.read_text()
    with _server(tmp_path, monkeypatch, base) as server:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("STORE_")},
            "STORE_NATS_URL": server.url,
            "STORE_NATS_USER": "store",
            "STORE_NATS_PASSWORD": PASSWORDS["STORE_PASS"],
            "STORE_NATS_INBOX_PREFIX": "_INBOX_store",
            "STORE_NATS_CONNECT_TIMEOUT_S": "3",
            "STORE_DATABASE_URL": f"sqlite:///{tmp_path}/store.db",
        }
        errors = tmp_path / "stderr.txt"
        with errors.open("w") as err:
            proc = await asyncio.create_subprocess_exec(STORE_SVC, "run", env=env, stderr=err)
        try:
            publisher = await _as(server, "publisher")
            for n in range(3):
                reply = await _write_when_up(publisher, _trade("REV", n))
                assert json.loads(reply.data)["accepted"] == 1
            await publisher.close()
            _reload(server, tmp_path, base.replace('{ user: "store", ', '{ user: "gone", ', 1))
            revoked = time.monotonic()
            code = await asyncio.wait_for(proc.wait(), 60)
            took = time.monotonic() - revoked
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = errors.read_text()
    assert code == 1, text[-3000:]
    assert "reconnecting was refused: authorization refused by the server" in text, text
    assert "the service cannot go on" in text
    assert "Traceback" not in text
    assert PASSWORDS["STORE_PASS"] not in text
    assert 3 <= took < 3 + 15, took  # the connect timeout, then a clean stop
    with sqlite3.connect(tmp_path / "store.db") as db:
        assert db.execute("SELECT count(*) FROM trades").fetchone() == (3,)


async def test_a_refusal_then_an_outage_is_waited_out_not_taken_for_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses a reconnect once, then is down (connection refused): that is
    a network fault again, and the service waits for the server as long as it takes,
    then carries on when it is back with the user."""
    base = CONF.read_text()
    with _server(tmp_path, monkeypatch, base) as server:
        async with _store(server, tmp_path, "core", nats_connect_timeout_s=2.0) as svc:
            _reload(server, tmp_path, base.replace('{ user: "store", ', '{ user: "gone", ', 1))
            await until(lambda: "authorization" in svc.control_nats.last_disconnect)
            port = server.port
            await asyncio.to_thread(server.stop)  # down before the 2 s are over
            await asyncio.sleep(4.0)  # twice the connect timeout, spent refused-then-down
            assert not svc.connection_lost.is_set()
            (tmp_path / "server.conf").write_text(base)
            server.port = port
            await asyncio.to_thread(server.start)
            await until(lambda: svc.ingest_nats.connected and svc.control_nats.connected)
            assert not svc.connection_lost.is_set()


async def _write_when_up(publisher: NATS, body: bytes) -> Msg:
    """A request-reply write, retried while the store is still starting."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await publisher.request("mdp.store.write.trades", body, timeout=2)
            except (nats.errors.NoRespondersError, TimeoutError):
                await asyncio.sleep(0.1)
