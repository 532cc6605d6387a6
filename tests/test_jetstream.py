"""JetStream mode in process: ack after commit, term and DLQ, no pulls at hard or paused,
two instances on one consumer, start-up checks. Real nats-server with a file store."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from store_svc.core import HealthStatus
from store_svc.devtools.natsserver import NatsServer
from store_svc.errors import ConfigError, JetStreamUnavailable
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings, load_settings

from .conftest import connected, until, until_async
from .test_bad_input import trade
from .test_ingest import count, locked

WRITE = "mdp.store.write.trades"


@pytest.fixture
def js_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream and its file store under the test's folder."""
    with NatsServer(store_dir=tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
def js_settings(js_server: NatsServer, db_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_url": js_server.url,
            "database_url": f"sqlite:///{db_path}",
            "ingest_mode": "jetstream",
            "js_ack_wait_s": 2.0,
            "js_fetch_expires_s": 0.5,
            "shutdown_grace_s": 10.0,
        }
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture
async def js_client(js_server: NatsServer) -> AsyncIterator[NATS]:
    async with connected(js_server.url) as nc:
        yield nc


def trades(n: int, symbol: str = "JS", start: int = 0) -> list[dict[str, Any]]:
    """``n`` trades with distinct keys (one second apart from ``start``)."""
    out = []
    for i in range(start, start + n):
        ts = f"2024-05-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z"
        out.append(trade(symbol=symbol, ts=ts, size=i + 1))
    return out


async def publish(js: JetStreamContext, records: list[dict[str, Any]], per_msg: int = 1) -> None:
    """Publish through JetStream, one message per ``per_msg`` records, each pub-acked."""
    for i in range(0, len(records), per_msg):
        await js.publish(WRITE, json.dumps(records[i : i + per_msg]).encode(), timeout=5)


async def consumer_state(js: JetStreamContext, settings: Settings) -> tuple[int, int, int]:
    """(pending, ack_pending, redelivered) of the store's consumer."""
    info = await js.consumer_info(settings.js_stream, settings.js_durable)
    return info.num_pending or 0, info.num_ack_pending or 0, info.num_redelivered or 0


async def test_records_are_stored_and_acked_only_after_commit(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings()
    js = js_client.jetstream()
    async with StoreService(settings) as svc:
        with locked(db_path):  # commits stall: messages are taken but must stay unacked
            await publish(js, trades(40), per_msg=4)
            await until(lambda: svc.stats.accepted["trades"] == 40)
            await asyncio.sleep(0.3)
            pending, ack_pending, _ = await consumer_state(js, settings)
            assert (pending, ack_pending) == (0, 10), "taken, not acked before the commit"
            assert svc.stats.js_acked == 0
        await until(lambda: svc.stats.js_acked == 10)
        assert count(db_path, "trades") == 40
        await until_async(lambda: _settled(js, settings))
        stream = await js.stream_info(settings.js_stream)
        assert stream.state.messages == 0, "workqueue retention: acked messages leave the stream"


async def _settled(js: JetStreamContext, settings: Settings) -> bool:
    pending, ack_pending, _ = await consumer_state(js, settings)
    return pending == 0 and ack_pending == 0


async def test_a_message_with_nothing_usable_is_terminated_and_on_the_dlq(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings()
    js = js_client.jetstream()
    dlq: list[Msg] = []

    async def collect(msg: Msg) -> None:
        dlq.append(msg)

    await js_client.subscribe("mdp.store.dlq.>", cb=collect)
    async with StoreService(settings) as svc:
        await publish(js, trades(5, start=0))
        await js.publish(WRITE, b'{"symbol": "POISON", not json', timeout=5)
        await js.publish(WRITE, json.dumps([trade(price="abc"), *trades(2, start=10)]).encode())
        await publish(js, trades(5, start=20))
        await until(lambda: count(db_path, "trades") == 12)
        await until(lambda: len(dlq) == 2)
        await asyncio.sleep(settings.js_ack_wait_s + 1)  # past the ack wait: no redelivery
        assert svc.stats.js_termed == 1
        assert svc.stats.js_redelivered == 0
        assert await _settled(js, settings)
    reasons = sorted(m.headers["Store-Reject-Reason"] for m in dlq if m.headers)
    assert reasons == ["invalid_number", "malformed_payload"]
    assert count(db_path, "trades") == 12


async def test_a_message_the_database_refuses_is_terminated_alone(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    """Messages taken in one pull share an envelope; one the database refuses for good
    is split off, put on the DLQ whole and terminated, and the others are acked."""
    settings = js_settings()
    js = js_client.jetstream()
    dlq: list[Msg] = []

    async def collect(msg: Msg) -> None:
        dlq.append(msg)

    await js_client.subscribe("mdp.store.dlq.>", cb=collect)
    async with StoreService(settings) as svc:
        with sqlite3.connect(db_path) as conn:
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON trades WHEN NEW.symbol = 'POISON' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        with locked(db_path):  # everything is taken before the first commit
            await publish(js, trades(30, start=0))
            await js.publish(WRITE, json.dumps(trade(symbol="POISON")).encode(), timeout=5)
            await publish(js, trades(30, start=100))
            await until(lambda: svc.stats.accepted["trades"] == 61)
        await until(lambda: svc.stats.js_acked == 60 and svc.stats.js_termed == 1)
        await until(lambda: len(dlq) == 1)
        await until_async(lambda: _settled(js, settings))
    assert dlq[0].headers is not None
    assert dlq[0].headers["Store-Reject-Reason"] == "sink_refused"
    assert json.loads(dlq[0].data)["symbol"] == "POISON"
    assert count(db_path, "trades") == 60


async def test_no_pulls_at_the_hard_watermark(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings(queue_capacity=100, batch_size=10, js_fetch_batch=8)
    js = js_client.jetstream()
    async with StoreService(settings) as svc:
        with locked(db_path):
            await publish(js, trades(2000), per_msg=10)  # 200 messages, 2,000 records
            await until(lambda: svc.feedback.level.value == "hard")
            await asyncio.sleep(1.0)
            pending, _, _ = await consumer_state(js, settings)
            delivered = 200 - pending
            # The queue holds 10 messages of 10 records; beyond that, only what open
            # pull requests had already asked for (two at most) may have come out.
            assert delivered <= 10 + 2 * settings.js_fetch_batch, "the rest stays in the stream"
            assert svc.stats.accepted["trades"] <= 10 * delivered
        await until(lambda: count(db_path, "trades") == 2000, timeout=30)
        await until_async(lambda: _settled(js, settings))


async def test_pause_stops_pulling_and_resume_starts_again(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings()
    js = js_client.jetstream()
    async with StoreService(settings) as svc:
        await svc._act(_action("pause"))
        await publish(js, trades(30))
        await asyncio.sleep(1.0)
        assert count(db_path, "trades") == 0
        pending, _, _ = await consumer_state(js, settings)
        assert pending == 30
        await svc._act(_action("resume"))
        await until(lambda: count(db_path, "trades") == 30)


async def test_a_resume_jetstream_cannot_serve_is_refused_503_and_stays_paused(
    js_settings: Callable[..., Settings], js_client: NATS
) -> None:
    """The consumer deleted while paused (and not to be made again): the resume is
    answered 503 with a retry hint, intake stays paused, and a later resume works."""
    from .test_admin import TOKEN, bearer, control

    settings = js_settings(js_create=False, admin_token=TOKEN)
    js = js_client.jetstream()
    await js.add_stream(name=settings.js_stream, subjects=["mdp.store.write.>"])
    config = {"durable_name": settings.js_durable, "ack_policy": "explicit"}
    await js.add_consumer(settings.js_stream, **config)
    async with StoreService(settings) as svc:
        await control(js_client, "pause", bearer())
        await js.delete_consumer(settings.js_stream, settings.js_durable)
        result, headers = await control(js_client, "resume", bearer())
        assert headers["Nats-Service-Error-Code"] == "503"
        assert "Store-Retry-After-Ms" in headers
        assert result.status == "error"
        assert result.detail.startswith("intake is still paused: the JetStream consumer store")
        assert svc.paused
        await js.add_consumer(settings.js_stream, **config)
        result, _ = await control(js_client, "resume", bearer())
        assert result.status == "ok", result
        assert not svc.paused


def _action(name: str) -> Any:
    from store_svc.core import ControlAction

    return ControlAction(name)


async def test_two_instances_share_one_consumer(
    js_settings: Callable[..., Settings], js_client: NATS, tmp_path: Path
) -> None:
    both = [js_settings(database_url=f"sqlite:///{tmp_path}/shared.db") for _ in range(2)]
    js = js_client.jetstream()
    async with StoreService(both[0]) as a, StoreService(both[1]) as b:
        await publish(js, trades(600), per_msg=3)
        await until(lambda: a.stats.js_acked + b.stats.js_acked == 200, timeout=30)
        assert a.stats.js_acked > 0, "both instances took messages"
        assert b.stats.js_acked > 0, "both instances took messages"
    assert count(tmp_path / "shared.db", "trades") == 600


async def test_missing_stream_without_create_stops_start_up(
    js_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(ConfigError, match="STORE_JS_CREATE"):
        async with StoreService(js_settings(js_create=False)):
            pass


async def test_a_server_without_jetstream_is_named_at_start_up(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(JetStreamUnavailable, match="JetStream"):
        async with StoreService(make_settings(ingest_mode="jetstream")):
            pass


async def test_stop_commits_and_acks_everything_taken(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings()
    js = js_client.jetstream()
    svc = StoreService(settings)
    await svc.start()
    with locked(db_path):
        await publish(js, trades(300), per_msg=10)
        await until(lambda: svc.stats.accepted["trades"] == 300)
        stopping = asyncio.create_task(svc.stop())
        await asyncio.sleep(0.5)  # the stop waits on the stalled commit
        assert not stopping.done()
    await asyncio.wait_for(stopping, 20)
    assert count(db_path, "trades") == 300
    assert svc.stats.js_acked == 30
    assert await _settled(js, settings)


async def test_what_the_grace_period_cuts_off_is_handed_back_at_once(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    from store_svc.errors import ShutdownTimeout

    settings = js_settings(shutdown_grace_s=1.0, js_ack_wait_s=60.0)
    js = js_client.jetstream()
    svc = StoreService(settings)
    await svc.start()
    with locked(db_path):
        await publish(js, trades(100), per_msg=10)
        await until(lambda: svc.stats.accepted["trades"] == 100)
        with pytest.raises(ShutdownTimeout):
            await svc.stop()
    assert svc.stats.js_naked == 10, "nak'd, not left to the 60 s ack wait"
    # A new instance gets them at once, long before the ack wait would run out.
    async with StoreService(js_settings(js_ack_wait_s=60.0)):
        await until(lambda: count(db_path, "trades") == 100, timeout=10)
    assert await _settled(js, settings)


async def test_a_deleted_consumer_is_made_again(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings()
    js = js_client.jetstream()
    async with StoreService(settings):
        await publish(js, trades(10))
        await until(lambda: count(db_path, "trades") == 10)
        await js.delete_consumer(settings.js_stream, settings.js_durable)
        await publish(js, trades(10, start=100))
        await until(lambda: count(db_path, "trades") == 20, timeout=20)
        info = await js.consumer_info(settings.js_stream, settings.js_durable)
        assert info.config.ack_wait == settings.js_ack_wait_s, "made again with the settings"


async def _intake(nc: NATS) -> dict[str, Any]:
    reply = await nc.request("mdp.store.health", b"", timeout=5)
    status = HealthStatus.model_validate_json(reply.data)
    (intake,) = [c for c in status.components if c.name == "intake"]
    return {"state": intake.state, **intake.details}


async def test_a_consumer_deleted_with_js_create_off_is_waited_for(
    js_settings: Callable[..., Settings],
    js_client: NATS,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pull requests find no responder (503) until an operator makes the consumer
    again: health shows it, the error is logged once (not once per check), and the
    store pulls again by itself."""
    caplog.set_level(logging.INFO, logger="store_svc.ingest.jetstream")
    settings = js_settings()
    js = js_client.jetstream()
    async with StoreService(settings):
        pass  # makes the stream and the consumer
    config = (await js.consumer_info(settings.js_stream, settings.js_durable)).config
    async with StoreService(js_settings(js_create=False)) as svc:
        await publish(js, trades(10))
        await until(lambda: count(db_path, "trades") == 10)
        await js.delete_consumer(settings.js_stream, settings.js_durable)
        requests = svc.stats.js_pull_requests

        async def unserved() -> bool:
            intake = await _intake(js_client)
            return intake["state"] == "degraded" and "jetstream_unserved_s" in intake

        await until_async(unserved, timeout=10)
        await until(lambda: svc.stats.js_pull_requests >= requests + 4, timeout=15)
        assert caplog.text.count("the JetStream consumer is not usable") == 1
        assert caplog.text.count("find no responder (503)") == 1
        await js.add_consumer(settings.js_stream, config)
        await publish(js, trades(10, start=100))
        await until(lambda: count(db_path, "trades") == 20, timeout=20)

        async def healthy() -> bool:
            intake = await _intake(js_client)
            return intake["state"] == "healthy" and "jetstream_unserved_s" not in intake

        await until_async(healthy, timeout=10)
        assert caplog.text.count("are served again") == 1
        # Gone a second time: an outage of its own, logged again.
        await js.delete_consumer(settings.js_stream, settings.js_durable)
        await until_async(unserved, timeout=10)
        await until(lambda: caplog.text.count("the JetStream consumer is not usable") == 2)
        await js.add_consumer(settings.js_stream, config)
        await publish(js, trades(10, start=200))
        await until(lambda: count(db_path, "trades") == 30, timeout=20)
        await until_async(healthy, timeout=10)
    assert caplog.text.count("are served again") == 2


async def test_pull_requests_the_consumer_refuses_are_asked_again_each_second(
    js_settings: Callable[..., Settings],
    js_client: NATS,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer made by an operator with a request limit below the store's pull
    size refuses every request (409): asked again each second, not in a tight loop,
    logged once, shown in health; the store pulls once the limit is raised."""
    settings = js_settings()
    js = js_client.jetstream()
    async with StoreService(settings):
        pass  # makes the stream and the consumer
    config = (await js.consumer_info(settings.js_stream, settings.js_durable)).config.as_dict()
    await js.delete_consumer(settings.js_stream, settings.js_durable)

    async def make(max_batch: int, action: str) -> None:
        # nats-py's ConsumerConfig has no max_batch: the API request, by hand.
        body = {"stream_name": settings.js_stream, "action": action}
        body["config"] = {**config, "max_batch": max_batch}
        subject = f"$JS.API.CONSUMER.CREATE.{settings.js_stream}.{settings.js_durable}"
        reply = json.loads((await js_client.request(subject, json.dumps(body).encode(), 5)).data)
        assert reply["config"].get("max_batch", 0) == max_batch, reply

    await make(1, "create")
    await publish(js, trades(10))
    async with StoreService(js_settings(js_create=False)) as svc:

        async def refused() -> bool:
            intake = await _intake(js_client)
            return intake["state"] == "degraded" and "MaxRequestBatch" in intake.get(
                "jetstream_refused", ""
            )

        await until_async(refused, timeout=10)
        first = svc.stats.js_pull_requests
        await asyncio.sleep(3.0)  # the rate of asking is what is measured here
        assert svc.stats.js_pull_requests - first <= 6, "asked again about once a second"
        assert caplog.text.count("are refused (409 Exceeded MaxRequestBatch") == 1
        assert count(db_path, "trades") == 0
        await make(0, "update")  # no limit
        await until(lambda: count(db_path, "trades") == 10, timeout=20)

        async def healthy() -> bool:
            intake = await _intake(js_client)
            return intake["state"] == "healthy" and "jetstream_refused" not in intake

        await until_async(healthy, timeout=10)


@pytest.mark.parametrize(
    ("reply", "count"),
    [
        ("$JS.ACK.STORE_WRITES.store.1.10.10.1700000000000000000.0", 1),
        ("$JS.ACK.STORE_WRITES.store.3.10.12.1700000000000000000.5", 3),
        ("$JS.ACK.hub.ACCHASH.STORE_WRITES.store.2.10.12.1700000000000000000.5.tok", 2),
        ("$JS.ACK.STORE_WRITES.store", None),
        ("_INBOX.abc", None),
        (None, None),
    ],
)
def test_delivery_count_from_the_ack_subject(reply: str | None, count: int | None) -> None:
    from store_svc.ingest.jetstream import delivery_count

    assert delivery_count(reply) == count


async def test_an_instance_whose_database_fails_hands_its_messages_to_another(
    js_settings: Callable[..., Settings], js_client: NATS, tmp_path: Path
) -> None:
    # Two instances on one consumer, each with its own database; A's is locked (as a
    # network partition between A and its database would). A's messages must end up
    # stored by B, and A must report healthy again once its database is back.
    a_db, b_db = tmp_path / "a.db", tmp_path / "b.db"
    common = {"js_handback_after_s": 0.5, "sink_retry_max_s": 0.2, "batch_size": 50}
    js = js_client.jetstream()
    async with StoreService(js_settings(database_url=f"sqlite:///{a_db}", **common)) as a:
        await until(lambda: a_db.exists())
        with locked(a_db):
            async with StoreService(js_settings(database_url=f"sqlite:///{b_db}", **common)):
                await publish(js, trades(300), per_msg=3)
                await until(lambda: count(b_db, "trades") == 300, timeout=30)
                assert a.stats.js_naked > 0, "A took messages and handed them back"
                assert not a.batcher.sink_ok
        await until(lambda: a.batcher.sink_ok, timeout=10)
        await until(lambda: a.feedback.level.value == "ok", timeout=5)
        assert await _settled(js, js_settings())
    # A may still have committed the one batch it was writing when it handed back.
    assert count(a_db, "trades") <= 2 * 50 * 3


async def test_a_lone_instance_takes_back_what_it_handed_back(
    js_settings: Callable[..., Settings], js_client: NATS, db_path: Path
) -> None:
    settings = js_settings(js_handback_after_s=0.3, sink_retry_max_s=0.2, batch_size=50)
    js = js_client.jetstream()
    async with StoreService(settings) as svc:
        await until(lambda: db_path.exists())
        with locked(db_path):
            await publish(js, trades(150), per_msg=3)
            await until(lambda: svc.stats.js_naked > 0, timeout=10)
            await asyncio.sleep(1.0)
        await until(lambda: count(db_path, "trades") == 150, timeout=20)
        await until_async(lambda: _settled(js, settings))
        assert svc.stats.js_redelivered > 0, "handed-back messages came back once it recovered"


async def test_core_mode_warns_when_a_stream_captures_the_write_subjects(
    js_server: NatsServer,
    js_client: NATS,
    db_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    js = js_client.jetstream()
    await js.add_stream(name="LEFTOVER", subjects=["mdp.store.write.trades.*"])
    settings = load_settings(nats_url=js_server.url, database_url=f"sqlite:///{db_path}")
    async with StoreService(settings) as svc:
        assert len(svc.warnings) == 1
        assert "LEFTOVER" in svc.warnings[0]
        assert "LEFTOVER" in caplog.text
        reply = await js_client.request("mdp.store.health", b"", timeout=2)
        status = HealthStatus.model_validate_json(reply.data)
        assert status.state == "degraded"
        intake = next(c for c in status.components if c.name == "intake")
        assert intake.state == "degraded"
        assert "LEFTOVER" in intake.details["warning"]
    await js.delete_stream("LEFTOVER")
    # Without such a stream (JetStream enabled, other streams present), no warning.
    await js.add_stream(name="OTHER", subjects=["elsewhere.>"])
    async with StoreService(settings) as svc:
        assert svc.warnings == []
