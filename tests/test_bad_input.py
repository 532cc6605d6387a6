"""Bad input gets a specific reason on the DLQ, is counted, and never costs good records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from store_svc.runtime.service import StoreService
from store_svc.settings import Settings

from .conftest import until

GOOD = {"symbol": "AAPL", "ts": "2024-05-01T13:30:00.5Z", "price": "187.25", "size": 100}


def trade(**changes: Any) -> dict[str, Any]:
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


@pytest.fixture
async def dlq(client: NATS) -> AsyncIterator[list[Msg]]:
    got: list[Msg] = []

    async def collect(msg: Msg) -> None:
        got.append(msg)

    sub = await client.subscribe("mdp.store.dlq.>", cb=collect)
    await client.flush()
    yield got
    await sub.unsubscribe()


@pytest.fixture
async def small_service(make_settings: Callable[..., Settings]) -> AsyncIterator[StoreService]:
    async with StoreService(make_settings(max_payload_bytes=4096)) as svc:
        yield svc


async def barrier(client: NATS, symbol: str = "BARRIER") -> dict[str, Any]:
    """A request-reply write: its answer means everything sent before it is committed.

    Like a well-behaved publisher it waits and retries while the store answers 503
    (overloaded), for as long as the store's retry hint says, and retries a request
    that timed out (it may have been dropped as a slow consumer; writes are idempotent).
    """
    async with asyncio.timeout(60):
        while True:
            try:
                reply = await client.request(
                    "mdp.store.write.trades", json.dumps(trade(symbol=symbol)).encode(), timeout=5
                )
            except NatsTimeout:
                continue
            if reply.headers and reply.headers.get("Nats-Service-Error-Code") == "503":
                await asyncio.sleep(int(reply.headers["Store-Retry-After-Ms"]) / 1000)
                continue
            return json.loads(reply.data)  # type: ignore[no-any-return]


async def symbols(svc: StoreService) -> list[str]:
    return sorted(row[0] for row in await svc.sink.rows("trades") if row[0] != "BARRIER")


# (description, subject, payload, headers, expected reason)
MESSAGE_LEVEL: list[tuple[str, str, bytes, dict[str, str] | None, str]] = [
    ("truncated JSON", "trades", b'{"symbol": "AAPL", "ts": ', None, "malformed_payload"),
    ("binary garbage", "trades", b"\xff\xfe\x00garbage", None, "malformed_payload"),
    ("unknown kind", "candles", json.dumps(GOOD).encode(), None, "unknown_kind"),
    ("empty body", "trades", b"", None, "empty_payload"),
    ("whitespace body", "trades", b"  \n ", None, "empty_payload"),
    ("empty array", "trades", b"[]", None, "empty_payload"),
    ("oversize", "trades", json.dumps([GOOD] * 60).encode(), None, "oversize_payload"),
    (
        "xml content type",
        "trades",
        b"<trade/>",
        {"Content-Type": "text/xml"},
        "unsupported_content_type",
    ),
    (
        "msgpack header on JSON",
        "trades",
        b'{"symbol": "AAPL"',
        {"Content-Type": "application/msgpack"},
        "malformed_payload",
    ),
    ("garbage Md-Ts", "options", b"{}", {"Md-Ts": "next tuesday"}, "bad_header"),
    ("absurd Md-Ts", "options", b"{}", {"Md-Ts": "99999999999999"}, "bad_header"),
    ("NaN Md-Ts", "options", b"{}", {"Md-Ts": "nan"}, "bad_header"),
    ("nested too deeply", "trades", b"[" * 4000, None, "malformed_payload"),
]


@pytest.mark.parametrize(
    ("subject", "payload", "headers", "reason"),
    [m[1:] for m in MESSAGE_LEVEL],
    ids=[m[0] for m in MESSAGE_LEVEL],
)
async def test_message_level_rejects(
    small_service: StoreService,
    client: NATS,
    dlq: list[Msg],
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    reason: str,
) -> None:
    await client.publish(f"mdp.store.write.{subject}", payload, headers=headers)
    await client.publish("mdp.store.write.trades", json.dumps(trade(symbol="AFTER")).encode())
    await barrier(client)
    assert await symbols(small_service) == ["AFTER"], "the service kept storing after bad input"
    await until(lambda: len(dlq) == 1)
    msg = dlq[0]
    assert msg.headers is not None
    assert msg.headers["Store-Reject-Reason"] == reason
    assert msg.headers["Store-Reject-Detail"]
    assert msg.headers["Store-Original-Subject"] == f"mdp.store.write.{subject}"
    assert msg.data == payload, "the DLQ carries the original bytes"
    expected_dlq = subject if subject != "candles" else "unknown"
    assert msg.subject == f"mdp.store.dlq.{expected_dlq}"
    assert small_service.stats.rejected[reason] == 1


# (description, bad record, expected reason)
RECORD_LEVEL: list[tuple[str, Any, str]] = [
    ("price of wrong type", trade(price=[1]), "wrong_type"),
    ("size as text", trade(size="lots"), "invalid_number"),
    ("symbol as number", trade(symbol=42), "wrong_type"),
    ("missing price", trade(price=...), "missing_field"),
    ("missing ts", trade(ts=...), "missing_field"),
    ("NaN price", trade(price="NaN"), "non_finite_number"),
    ("infinite price", trade(price="-Infinity"), "non_finite_number"),
    ("year 9999", trade(ts="9999-12-31T00:00:00Z"), "timestamp_out_of_range"),
    ("year 1800", trade(ts="1800-01-01T00:00:00Z"), "timestamp_out_of_range"),
    ("epoch microseconds", trade(ts=1_714_570_200_000_000), "timestamp_out_of_range"),
    ("unparseable ts", trade(ts="yesterday"), "invalid_timestamp"),
    ("size beyond 64 bits", trade(size=2**70), "number_out_of_range"),
    ("price 1e400", trade(price="1e400"), "number_out_of_range"),
    ("empty symbol", trade(symbol=""), "invalid_symbol"),
    ("NUL in symbol", trade(symbol="A\u0000B"), "invalid_symbol"),
    ("NUL in exchange", trade(exchange="X\u0000"), "invalid_text"),
    ("NUL in a condition", trade(conditions=["@", "\u0000"]), "invalid_text"),
    ("zero with a huge scale", trade(price="0E-100000"), "number_out_of_range"),
    ("too many digits", trade(price="1." + "0" * 100), "number_out_of_range"),
    ("offset time before year 1", trade(ts="0001-01-01T00:00:00+01:00"), "timestamp_out_of_range"),
    ("not an object", 17, "not_an_object"),
    ("null record", None, "not_an_object"),
]


@pytest.mark.parametrize(
    ("bad", "reason"), [r[1:] for r in RECORD_LEVEL], ids=[r[0] for r in RECORD_LEVEL]
)
async def test_bad_record_among_good_ones(
    store: StoreService, client: NATS, dlq: list[Msg], bad: Any, reason: str
) -> None:
    records = [trade(symbol="GOOD1"), bad, trade(symbol="GOOD2")]
    await client.publish("mdp.store.write.trades", json.dumps(records).encode())
    await barrier(client)
    assert await symbols(store) == ["GOOD1", "GOOD2"]
    await until(lambda: len(dlq) == 1)
    msg = dlq[0]
    assert msg.headers is not None
    assert msg.headers["Store-Reject-Reason"] == reason
    assert msg.headers["Store-Record-Index"] == "1"
    assert json.loads(msg.data) == bad, "the DLQ carries the record's own bytes"
    assert store.stats.rejected == {reason: 1}
    assert store.stats.committed["trades"] == 3  # two good ones and the barrier


async def test_bad_record_in_msgpack_array(
    store: StoreService, client: NATS, dlq: list[Msg]
) -> None:
    records = [trade(symbol="GOOD1"), trade(price="NaN"), trade(symbol="GOOD2")]
    await client.publish(
        "mdp.store.write.trades",
        msgspec.msgpack.encode(records),
        headers={"Content-Type": "application/msgpack"},
    )
    await barrier(client)
    assert await symbols(store) == ["GOOD1", "GOOD2"]
    await until(lambda: len(dlq) == 1)
    assert msgspec.msgpack.decode(dlq[0].data) == records[1]
    assert dlq[0].headers is not None
    assert dlq[0].headers["Content-Type"] == "application/msgpack"


async def test_symbol_token_must_match(store: StoreService, client: NATS, dlq: list[Msg]) -> None:
    records = [trade(symbol="BRK.B"), trade(symbol="AAPL")]
    await client.publish("mdp.store.write.trades.BRK.B", json.dumps(records).encode())
    await barrier(client)
    assert await symbols(store) == ["BRK.B"]
    await until(lambda: len(dlq) == 1)
    assert dlq[0].headers is not None
    assert dlq[0].headers["Store-Reject-Reason"] == "symbol_mismatch"


async def test_hostile_header_values_are_survived(
    service: StoreService, client: NATS, dlq: list[Msg]
) -> None:
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "X-Junk": "x" * 20_000,
        "Md-Ts": "2024-01-01T00:00:00Z",
    }
    await client.publish("mdp.store.write.trades", json.dumps(trade()).encode(), headers=headers)
    # A hostile detail (control characters) must not break the DLQ message's headers.
    await client.publish(
        "mdp.store.write.trades", json.dumps(trade(symbol="A\r\nB: c", ts="\r\nX")).encode()
    )
    assert (await barrier(client))["accepted"] == 1
    assert await symbols(service) == ["AAPL"]
    await until(lambda: len(dlq) == 1)
    assert dlq[0].headers is not None
    assert "\n" not in dlq[0].headers["Store-Reject-Detail"]


async def test_request_reply_write_with_bad_input_gets_400(
    store: StoreService, client: NATS
) -> None:
    reply = await client.request("mdp.store.write.trades", b"not json", timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    assert reply.headers["Nats-Service-Error"].startswith("malformed_payload")
    body = json.loads(reply.data)
    assert body["accepted"] == 0
    assert body["rejected"] == 1

    all_bad = [trade(price="NaN"), trade(size="x")]
    reply = await client.request("mdp.store.write.trades", json.dumps(all_bad).encode(), timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    assert [e["index"] for e in json.loads(reply.data)["errors"]] == [0, 1]

    mixed = [trade(symbol="OK"), trade(price="NaN")]
    reply = await client.request("mdp.store.write.trades", json.dumps(mixed).encode(), timeout=5)
    assert not reply.headers
    body = json.loads(reply.data)
    assert body["accepted"] == 1
    assert body["rejected"] == 1
    assert body["errors"] == [
        {"index": 1, "reason": "non_finite_number", "detail": "price is NaN, not a finite number"}
    ]
    assert await symbols(store) == ["OK"]


async def test_a_separate_publisher_connection_sees_nothing_break(
    service: StoreService, nats_server: Any, client: NATS
) -> None:
    """Many bad messages from one connection; the service still serves another."""
    for i in range(200):
        await client.publish("mdp.store.write.trades", bytes([i % 256]) * (i + 1))
    other = await nats.connect(nats_server.url)
    try:
        reply = await other.request(
            "mdp.store.write.trades", json.dumps(trade(symbol="LATER")).encode(), timeout=10
        )
        assert json.loads(reply.data)["accepted"] == 1
    finally:
        await other.close()
    assert service.stats.rejected_total == 200


async def test_header_names_ignore_case(service: StoreService, client: NATS) -> None:
    reply = await client.request(
        "mdp.store.write.trades",
        msgspec.msgpack.encode([trade(symbol="LOWER")]),
        headers={"content-type": "application/msgpack"},
        timeout=5,
    )
    assert json.loads(reply.data)["accepted"] == 1
    assert await symbols(service) == ["LOWER"]


async def test_md_ts_matters_only_for_options(service: StoreService, client: NATS) -> None:
    reply = await client.request(
        "mdp.store.write.trades",
        json.dumps(trade(symbol="T")).encode(),
        headers={"Md-Ts": "not a time"},
        timeout=5,
    )
    assert json.loads(reply.data)["accepted"] == 1


async def test_a_malformed_message_of_nearly_the_max_payload_leaves_the_service_connected(
    service: StoreService, client: NATS, dlq: list[Msg]
) -> None:
    # Sent on to the DLQ with its reason headers, the whole body would exceed the
    # server's maximum payload; the server would then cut the service's connection.
    body = b"{" + b"x" * (client.max_payload - 100)
    await client.publish("mdp.store.write.trades", body)
    await until(lambda: len(dlq) == 1)
    msg = dlq[0]
    assert msg.headers is not None
    assert msg.headers["Store-Reject-Reason"] == "malformed_payload"
    assert msg.headers["Store-Payload-Truncated"] == str(len(body))
    assert body.startswith(msg.data)
    assert len(msg.data) > len(body) - 2048
    assert service.nc is not None
    assert service.nc.is_connected
    reply = await client.request("mdp.store.write.trades", json.dumps(trade()).encode(), timeout=5)
    assert json.loads(reply.data)["accepted"] == 1


async def test_msgpack_text_that_is_not_utf8_costs_only_its_record(
    store: StoreService, client: NATS, dlq: list[Msg]
) -> None:
    good = [msgspec.msgpack.encode(trade(symbol=f"GOOD{i}")) for i in (1, 2)]
    bad = msgspec.msgpack.encode(trade(symbol="BADUTF8")).replace(b"BADUTF8", b"BAD\xff\xfeF8")
    payload = b"\x93" + good[0] + bad + good[1]  # a 3-element MessagePack array
    reply = await client.request(
        "mdp.store.write.trades",
        payload,
        headers={"Content-Type": "application/msgpack"},
        timeout=10,
    )
    body = json.loads(reply.data)
    assert body["accepted"] == 2
    assert body["errors"] == [
        {"index": 1, "reason": "invalid_text", "detail": "a text is not valid UTF-8"}
    ]
    assert await symbols(store) == ["GOOD1", "GOOD2"]
    await until(lambda: len(dlq) == 1)
    assert dlq[0].data == bad
