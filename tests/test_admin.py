"""Admin control behind the token: pause, resume, reload, audit, and the refusals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from store_svc.core import AuditEnvelope, ControlAction, ControlResult, HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import until
from .test_bad_input import barrier, trade
from .test_ingest import count, locked

TOKEN = "s3cret-Admin-Token-0123456789"
STORE_SVC = str(Path(sys.executable).parent / "store-svc")


@pytest.fixture
async def audit(client: NATS) -> AsyncIterator[list[AuditEnvelope]]:
    got: list[AuditEnvelope] = []

    async def collect(msg: Msg) -> None:
        got.append(AuditEnvelope.model_validate_json(msg.data))

    sub = await client.subscribe("mdp.telemetry.audit", cb=collect)
    await client.flush()
    yield got
    await sub.unsubscribe()


async def control(
    client: NATS, action: str, headers: dict[str, str] | None
) -> tuple[ControlResult, dict[str, str]]:
    reply = await client.request(f"mdp.store.control.{action}", b"", headers=headers, timeout=5)
    return ControlResult.model_validate_json(reply.data), dict(reply.headers or {})


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Md-Actor": "ops@desk"}


async def test_pause_keeps_the_queue_and_resume_restarts_intake(
    make_settings: Callable[..., Settings],
    client: NATS,
    db_path: Path,
    audit: list[AuditEnvelope],
) -> None:
    async with StoreService(make_settings(admin_token=TOKEN, sink_retry_max_s=0.2)) as svc:
        with locked(db_path):
            for i in range(50):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: svc.stats.accepted["trades"] == 50)
            result, headers = await control(client, "pause", bearer())
            assert result.status == "ok", result
            assert "paused" in (result.detail or "")
            assert not headers, "a reply never carries the request's headers (the token)"
        await until(lambda: svc.stats.committed["trades"] == 50, timeout=20)
        ready = await client.request("mdp.store.ready", b"", timeout=2)
        assert ready.headers is not None
        assert ready.headers["Nats-Service-Error-Code"] == "503"
        assert "paused" in ready.headers["Nats-Service-Error"]
        health = HealthStatus.model_validate_json(
            (await client.request("mdp.store.health", b"", timeout=2)).data
        )
        assert next(c for c in health.components if c.name == "intake").details["status"] == (
            "paused"
        )
        with pytest.raises(NoRespondersError):
            await client.request("mdp.store.write.trades", json.dumps(trade()).encode(), timeout=2)
        result, _ = await control(client, "pause", bearer())
        assert result.detail == "intake was already paused"
        result, _ = await control(client, "resume", bearer())
        assert result.status == "ok"
        assert (await barrier(client))["accepted"] == 1
    assert count(db_path, "trades") == 51
    await until(lambda: len(audit) == 3)
    assert [(a.action, a.result.status, a.role, a.actor) for a in audit] == [
        (ControlAction.pause, "ok", "admin", "ops@desk"),
        (ControlAction.pause, "ok", "admin", "ops@desk"),
        (ControlAction.resume, "ok", "admin", "ops@desk"),
    ]


async def test_reload_changes_runtime_settings_and_says_which(
    make_settings: Callable[..., Settings], client: NATS, tmp_path: Path
) -> None:
    env_file = tmp_path / "store.env"
    env_file.write_text("STORE_BATCH_SIZE=1000\n")
    settings = make_settings(admin_token=TOKEN, env_file=env_file, queue_capacity=5000)
    async with StoreService(settings) as svc:
        env_file.write_text(
            "STORE_BATCH_SIZE=250\nSTORE_FLUSH_INTERVAL_MS=40\nSTORE_LOG_LEVEL=DEBUG\n"
            "STORE_SOFT_WATERMARK=0.6\nSTORE_HARD_WATERMARK=0.9\n"
        )
        result, _ = await control(client, "reload", bearer())
        assert result.status == "ok"
        detail = result.detail or ""
        for change in (
            "batch_size 1000 -> 250",
            "flush_interval_ms 10 -> 40",
            "log_level INFO -> DEBUG",
            "soft_watermark 0.5 -> 0.6",
            "hard_watermark 0.8 -> 0.9",
        ):
            assert change in detail
        assert svc.batcher.batch_size == 250
        assert svc.batcher.flush_interval == pytest.approx(0.04)
        assert svc.feedback.marks.soft == 3000
        assert logging.getLogger("store_svc").level == logging.DEBUG
        result, _ = await control(client, "reload", bearer())
        assert result.detail == "nothing changed"
        env_file.write_text("STORE_BATCH_SIZE=99999\n")
        result, headers = await control(client, "reload", bearer())
        assert result.status == "error"
        assert headers["Nats-Service-Error-Code"] == "400"
        assert "batch_size" in (result.detail or "")
        assert svc.batcher.batch_size == 250, "a refused reload changes nothing"
    logging.getLogger("store_svc").setLevel(logging.NOTSET)


REFUSALS: list[tuple[str, dict[str, str] | None, str]] = [
    ("missing header", None, "401"),
    ("wrong token", {"Authorization": "Bearer not-the-token"}, "401"),
    ("empty token", {"Authorization": "Bearer "}, "401"),
    ("padded token", {"Authorization": f"Bearer  {TOKEN} "}, "401"),
    ("lowercase scheme", {"Authorization": f"bearer {TOKEN}"}, "401"),
    ("no scheme", {"Authorization": TOKEN}, "401"),
    ("basic scheme", {"Authorization": f"Basic {TOKEN}"}, "401"),
    ("prefix of the token", {"Authorization": f"Bearer {TOKEN[:-1]}"}, "401"),
    ("token plus more", {"Authorization": f"Bearer {TOKEN}x"}, "401"),
    ("very long", {"Authorization": "Bearer " + "A" * 20_000}, "401"),
]


@pytest.mark.parametrize(
    ("headers", "code"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
async def test_only_the_exact_token_is_accepted(
    make_settings: Callable[..., Settings],
    client: NATS,
    audit: list[AuditEnvelope],
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str] | None,
    code: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with StoreService(make_settings(admin_token=TOKEN)) as svc:
        for action in ("pause", "resume", "reload"):
            result, reply_headers = await control(client, action, headers)
            assert result.status == "error"
            assert reply_headers["Nats-Service-Error-Code"] == code
        assert not svc.paused
        await until(lambda: len(audit) == 3)
    assert all(a.result.status == "error" and a.role == "anonymous" for a in audit)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in a.model_dump_json() for a in audit)


async def test_no_token_configured_disables_control(
    make_settings: Callable[..., Settings], client: NATS, audit: list[AuditEnvelope]
) -> None:
    async with StoreService(make_settings()) as svc:
        result, headers = await control(client, "pause", bearer())
        assert headers["Nats-Service-Error-Code"] == "403"
        assert "no admin token is configured" in (result.detail or "")
        assert not svc.paused
    await until(lambda: len(audit) == 1)


async def test_the_token_on_other_subjects_does_nothing(
    make_settings: Callable[..., Settings],
    client: NATS,
    audit: list[AuditEnvelope],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with StoreService(make_settings(admin_token=TOKEN)) as svc:
        _, headers = await control(client, "shutdown", bearer())
        assert headers["Nats-Service-Error-Code"] == "404"
        reply = await client.request("mdp.store.health", b"", headers=bearer(), timeout=2)
        assert HealthStatus.model_validate_json(reply.data).state == "healthy"
        assert "Authorization" not in (reply.headers or {})
        reply = await client.request(
            "mdp.store.write.trades", json.dumps(trade()).encode(), headers=bearer(), timeout=5
        )
        assert json.loads(reply.data)["accepted"] == 1
        assert "Authorization" not in (reply.headers or {})
        assert not svc.paused
    await asyncio.sleep(0.2)
    assert audit == []
    assert TOKEN not in caplog.text


async def test_cli_control(
    make_settings: Callable[..., Settings], nats_server: NatsServer, client: NATS
) -> None:
    def cli(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
        env.pop("ADMIN_TOKEN", None)
        env["STORE_NATS_URL"] = nats_server.url
        if token is not None:
            env["ADMIN_TOKEN"] = token
        return subprocess.run(
            [STORE_SVC, "control", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    async with StoreService(make_settings(admin_token=TOKEN)) as svc:
        out = await asyncio.to_thread(cli, "pause", token=TOKEN)
        assert out.returncode == 0, out.stderr
        assert ControlResult.model_validate_json(out.stdout).status == "ok"
        assert svc.paused
        out = await asyncio.to_thread(cli, "resume", token="wrong-token-0123456789")
        assert out.returncode == 1
        assert svc.paused
        out = await asyncio.to_thread(cli, "resume", token=TOKEN)
        assert out.returncode == 0
        assert not svc.paused
        out = await asyncio.to_thread(cli, "reload", token=None)
        assert out.returncode == 2
        assert "STORE_ADMIN_TOKEN" in out.stderr
    _: Any = client


async def test_pause_and_resume_with_traffic_flowing(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    """Request-reply writes retried as documented are all stored once; nothing is
    stored while paused."""
    async with StoreService(make_settings(admin_token=TOKEN)) as svc:
        done: list[int] = []

        async def publisher() -> None:
            for i in range(300):
                payload = json.dumps(trade(symbol="FLOW", size=i)).encode()
                while True:
                    try:
                        reply = await client.request("mdp.store.write.trades", payload, timeout=5)
                    except NoRespondersError:
                        await asyncio.sleep(0.01)  # paused: nobody takes writes; retry
                        continue
                    if not reply.headers:
                        break
                done.append(i)

        task = asyncio.create_task(publisher())
        await until(lambda: len(done) >= 50)
        result, _ = await control(client, "pause", bearer())
        assert result.status == "ok"
        await until(lambda: svc.stats.committed_total == sum(svc.stats.accepted.values()))
        stored_at_pause = count(db_path, "trades")
        await asyncio.sleep(0.3)  # traffic keeps coming; none of it may be stored
        assert count(db_path, "trades") == stored_at_pause
        assert not task.done()
        result, _ = await control(client, "resume", bearer())
        assert result.status == "ok"
        await asyncio.wait_for(task, 60)
    assert count(db_path, "trades") == 300
    assert done == list(range(300))


async def test_a_shutdown_during_a_pause_waits_for_the_pause_drain(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    svc = StoreService(make_settings(admin_token=TOKEN, queue_capacity=20, batch_size=10))
    await svc.start()
    with locked(db_path):  # the queue fills and the pause drain has to wait for room
        for i in range(60):
            await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
        await client.flush()
        await until(lambda: svc.queue.depth >= 10)
        pausing = asyncio.ensure_future(control(client, "pause", bearer()))
        await until(lambda: svc.paused)  # the pause drain has begun
        stopping = asyncio.create_task(svc.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()
    await asyncio.wait_for(stopping, 30)
    result, _ = await pausing
    assert result.status == "ok"
    assert count(db_path, "trades") == 60, "nothing the pause was still delivering is lost"


async def test_control_while_starting_is_503_with_a_retry_hint(
    make_settings: Callable[..., Settings],
    client: NATS,
    db_path: Path,
    audit: list[AuditEnvelope],
) -> None:
    async with StoreService(make_settings()):
        pass  # create the database, so it can be locked below
    svc = StoreService(make_settings(admin_token=TOKEN))
    with locked(db_path):  # the schema check waits for the lock: start-up hangs there
        starting = asyncio.create_task(svc.start())
        await until(lambda: svc.admin._sub is not None)
        result, headers = await control(client, "pause", bearer())
        assert result.status == "error"
        assert "starting" in result.detail
        assert headers["Nats-Service-Error-Code"] == "503"
        assert int(headers["Store-Retry-After-Ms"]) > 0
        await until(lambda: len(audit) == 1)
        assert audit[0].result.status == "error"
    await asyncio.wait_for(starting, 30)
    await svc.stop()


async def test_a_pause_behind_a_full_queue_loses_nothing_and_keeps_the_order(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    """Commits stalled, the queue full and messages still held by the client when the
    pause comes: the pause returns after its wait; a resume while they are still held
    puts the new writes behind them; every write is stored, in order, none dropped."""
    settings = make_settings(
        admin_token=TOKEN, queue_capacity=100, batch_size=50, shutdown_grace_s=1.0,
        sink_retry_max_s=0.2,
    )  # fmt: skip
    async with StoreService(settings) as svc:
        intake: Any = svc._intake
        with locked(db_path):
            for i in range(600):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
            await until(lambda: svc.stats.messages + intake.pending_msgs == 600)
            assert intake.pending_msgs > 0, "the client holds messages behind the full queue"
            result, _ = await control(client, "pause", bearer())
            assert result.status == "ok", result
            assert intake.pending_msgs > 0, "still held after the pause's wait"
            result, _ = await control(client, "resume", bearer())
            assert result.status == "ok"
            for i in range(600, 610):
                await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
            await client.flush()
        await until(lambda: svc.stats.committed["trades"] == 610, timeout=30)
        assert svc.stats.dropped_messages == 0
    with sqlite3.connect(db_path) as conn:
        sizes = [r[0] for r in conn.execute("SELECT size FROM trades ORDER BY rowid")]
    assert sizes == list(range(610)), "written in the order published"


async def test_a_shutdown_while_paused_stores_what_intake_held(
    make_settings: Callable[..., Settings], client: NATS, db_path: Path
) -> None:
    # The pause waits half the grace period (2 s), then returns with messages held.
    settings = make_settings(
        admin_token=TOKEN, queue_capacity=100, batch_size=50, shutdown_grace_s=4.0,
        sink_retry_max_s=0.2,
    )  # fmt: skip
    svc = StoreService(settings)
    await svc.start()
    intake: Any = svc._intake
    with locked(db_path):
        for i in range(600):
            await client.publish("mdp.store.write.trades", json.dumps(trade(size=i)).encode())
        await client.flush()
        await until(lambda: svc.stats.messages + intake.pending_msgs == 600)
        result, _ = await control(client, "pause", bearer())
        assert result.status == "ok", result
        assert intake.pending_msgs > 0
    await svc.stop()  # the database is back: what intake held is stored in the grace
    assert svc.stats.committed["trades"] == 600
    assert svc.stats.dropped_messages == 0
    assert count(db_path, "trades") == 600
