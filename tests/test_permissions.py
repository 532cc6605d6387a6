"""Least privilege: the store runs against ``deploy/nats-server.conf`` itself, where
its user has exactly the documented permissions, in core and JetStream mode; the
whole path works with nothing refused, and a permission taken away is counted, logged
once and shows in health."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import load_settings

from .conftest import until

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats-server.conf"
PASSWORDS = {
    "STORE_PASS": "store-pw-41",
    "PUBLISHER_PASS": "publisher-pw-42",
    "PIPELINE_PASS": "pipeline-pw-43",
    "OPERATOR_PASS": "operator-pw-44",
}
TOKEN = "admin-token-for-the-test"


def _server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str) -> NatsServer:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)  # the config reads them; nats-server inherits
    path = tmp_path / "server.conf"
    path.write_text(conf)
    return NatsServer(store_dir=tmp_path / "js", extra_args=("-c", str(path)))


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    """A nats-server running the documented configuration."""
    with _server(tmp_path, monkeypatch, CONF.read_text()) as server:
        yield server


async def _as(server: NatsServer, user: str) -> NATS:
    password = PASSWORDS[f"{user.upper()}_PASS"]
    return await nats.connect(server.url, user=user, password=password)


@pytest.fixture
async def users(locked: NatsServer) -> AsyncIterator[dict[str, NATS]]:
    clients = {u: await _as(locked, u) for u in ("publisher", "pipeline", "operator")}
    yield clients
    for nc in clients.values():
        await nc.close()


def _store(server: NatsServer, tmp_path: Path, mode: str) -> StoreService:
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
        )
    )


def _trade(symbol: str, n: int = 0) -> bytes:
    return json.dumps(
        {"symbol": symbol, "ts": 1_700_000_000 + n, "price": "1.5", "size": 1}
    ).encode()


@pytest.mark.parametrize("mode", ["core", "jetstream"])
async def test_the_whole_path_works_with_only_the_documented_permissions(
    mode: str, locked: NatsServer, users: dict[str, NATS], tmp_path: Path
) -> None:
    publisher, pipeline, operator = users["publisher"], users["pipeline"], users["operator"]
    feedback: list[Msg] = []
    dlq: list[Msg] = []
    audit: list[Msg] = []
    await pipeline.subscribe("mdp.telemetry.feedback", cb=_keeper(feedback))
    await operator.subscribe("mdp.store.dlq.>", cb=_keeper(dlq))
    await operator.subscribe("mdp.telemetry.audit", cb=_keeper(audit))
    await operator.flush()
    async with _store(locked, tmp_path, mode) as svc:
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
        # Nothing the store did was refused: no denial counted, none in the server log.
        assert [c.permission_denials for c in (svc.ingest_nats, svc.control_nats)] == [0, 0]
    log = b"".join(locked.log).decode(errors="replace")
    assert not re.search(r"store.*Permissions Violation", log), log[-2000:]


def _keeper(into: list[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def keep(msg: Msg) -> None:
        into.append(msg)

    return keep


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
