"""The read API against a real nats-server and both real sinks.

What is written through the write subjects comes back through the query subjects
equal, in sort-key order, with paging that never skips or repeats; latest returns
the last record per symbol; bad requests get a 400 with a specific reason; a query
past its deadline gets a 504 and leaves the service working.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from store_svc.devtools.pgserver import PostgresServer
from store_svc.kinds import KINDS
from store_svc.read.cursor import encode_cursor
from store_svc.runtime.service import StoreService
from store_svc.settings import Settings
from store_svc.store.codec import compile_readout, encoder_for, rfc3339
from store_svc.store.reads import PagePlan, core_fields, sort_key
from store_svc.store.sqlite_read import SqliteReader

from .conftest import until
from .strategies import BY_KIND, as_utc
from .test_metrics import scrape

pytestmark = pytest.mark.slow

#: Symbol suffixes whose UTF-8 byte order differs from most collations' order.
SUFFIXES = ["a", "B", "é", "Z", "aa", "€"]
#: Few distinct times, so records tie on time and the rest of the key decides.
TIMES = [
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2024, 1, 2, 9, 30, 0, 1, tzinfo=UTC),
    datetime(2024, 1, 2, 9, 30, 0, 500000, tzinfo=UTC),
    datetime(2025, 6, 30, 16, 0, tzinfo=UTC),
]
#: Condition codes with characters JSON escapes, and text beyond ASCII.
CONDITIONS = st.lists(
    st.sampled_from(["@", "T", 'q"', "back\\slash", "\x01", "é", "€x", "", "\u2028"]),
    max_size=3,
)
PRICES = st.sampled_from([Decimal("1.5"), Decimal("1.50"), Decimal("10"), Decimal("9.99"),
                          Decimal("1E+2"), Decimal("-0.25")])  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[StoreService]:
    """A running service on each sink. The PostgreSQL database collates text by ICU
    "en-US" (a < B < é < Z), not byte order, so results must not depend on it."""
    if request.param == "sqlite":
        async with StoreService(make_settings(database_url=f"sqlite:///{tmp_path}/q.db")) as svc:
            yield svc
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"q_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(
            f"CREATE DATABASE {name} LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0"
        )
    finally:
        await conn.close()
    try:
        async with StoreService(make_settings(database_url=server.url(name))) as svc:
            yield svc
    finally:
        conn = await asyncpg.connect(server.dsn)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()


def _time_field(kind: str) -> str:
    return "timestamp" if kind == "quotes" else "ts"


def _record(kind: str, symbols: list[str], times: list[datetime]) -> st.SearchStrategy[BaseModel]:
    """Core records on a few symbols and times, so keys collide and times tie."""

    def adjust(base: BaseModel, symbol: str, when: datetime, extra: dict[str, Any]) -> BaseModel:
        update: dict[str, Any] = {"symbol": symbol, **extra}
        if kind != "options":
            update[_time_field(kind)] = when
        return base.model_copy(update=update)

    extra: st.SearchStrategy[dict[str, Any]] = st.just({})
    if kind == "trades":
        extra = st.fixed_dictionaries(
            {
                "price": PRICES,
                "size": st.sampled_from([1, 100]),
                "exchange": st.sampled_from([None, "", "X", "é"]),
                "conditions": CONDITIONS,
            }
        )
    elif kind == "options":
        extra = st.fixed_dictionaries({"strike": PRICES})
    return st.builds(adjust, BY_KIND[kind], st.sampled_from(symbols), st.sampled_from(times), extra)


def _values(kind: str, record: BaseModel, md_ts: datetime | None) -> dict[str, Any]:
    out = {k: as_utc(v) if isinstance(v, datetime) else v for k, v in record.model_dump().items()}
    if kind == "trades":
        out["conditions"] = tuple(out["conditions"])
    if kind == "options":
        assert md_ts is not None
        out["ts"] = md_ts
    return out


def _row(kind: str, values: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(values[c] for c in KINDS[kind].columns)


def _expected(kind: str, written: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Apply the table's upsert rule: later writes win, except trades (first wins)."""
    spec = KINDS[kind]
    table: dict[tuple[Any, ...], dict[str, Any]] = {}
    for values in written:
        key = tuple(values[c] for c in spec.key)
        if spec.on_conflict == "update" or key not in table:
            table[key] = values
    return table


def _parse(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    """A reply record as Core reads it, times in UTC (options: with the store's ts)."""
    spec = KINDS[kind]
    model = spec.core_model.model_validate(
        {k: v for k, v in record.items() if kind != "options" or k != "ts"}
    )
    return _values(
        kind, model, as_utc(datetime.fromisoformat(record["ts"])) if kind == "options" else None
    )


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


async def _request(
    client: NATS, subject: str, body: dict[str, Any], fmt: str = "json"
) -> tuple[dict[str, Any], dict[str, str]]:
    if fmt == "msgpack":
        msg = await client.request(
            subject,
            msgspec.msgpack.encode(body),
            headers={"Content-Type": "application/msgpack"},
            timeout=10,
        )
        assert (msg.headers or {}).get("Content-Type") == "application/msgpack"
        return msgspec.msgpack.decode(msg.data), dict(msg.headers or {})
    msg = await client.request(subject, json.dumps(body).encode(), timeout=10)
    return json.loads(msg.data), dict(msg.headers or {})


async def _write(
    client: NATS, kind: str, records: list[BaseModel], md_ts: datetime
) -> list[dict[str, Any]]:
    payload = json.dumps([json.loads(r.model_dump_json()) for r in records]).encode()
    reply = await client.request(
        f"mdp.store.write.{kind}", payload, headers={"Md-Ts": md_ts.isoformat()}, timeout=10
    )
    assert json.loads(reply.data)["accepted"] == len(records)
    return [_values(kind, r, md_ts) for r in records]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_written_records_come_back_equal_in_order_across_pages(
    store: StoreService, client: NATS, kind: str, fmt: str, data: st.DataObject
) -> None:
    token = uuid.uuid4().hex[:6]  # the database outlives one example: own symbols
    # Few symbols and times per example, so records tie on them and the rest of the
    # sort key decides the order.
    suffixes = data.draw(st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=4, unique=True))
    pool = [token + s for s in suffixes]
    times = data.draw(st.lists(st.sampled_from(TIMES), min_size=1, max_size=3, unique=True))
    written: list[dict[str, Any]] = []
    for _ in range(data.draw(st.integers(1, 4), label="messages")):
        records = data.draw(st.lists(_record(kind, pool, times), min_size=1, max_size=12))
        written += await _write(client, kind, records, data.draw(st.sampled_from(TIMES)))
    table = _expected(kind, written)

    asked = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4), label="symbols")
    body: dict[str, Any] = {"symbol": asked[0] if len(asked) == 1 else asked}
    start = data.draw(st.none() | st.sampled_from(TIMES), label="start")
    end = data.draw(st.none() | st.sampled_from(TIMES), label="end")
    if start is not None and end is not None and end <= start:
        start, end = (end, start) if end < start else (start, None)
    when_text = st.sampled_from(["rfc3339", "epoch"])
    if start is not None:
        use = data.draw(when_text)
        body["start"] = start.isoformat() if use == "rfc3339" else start.timestamp()
    if end is not None:
        body["end"] = end.isoformat()
    resolution = None
    if kind == "bars":
        resolution = data.draw(st.none() | st.sampled_from(["1s", "1m", "1d"]), label="res")
        if resolution is not None:
            body["resolution"] = resolution
    limit = data.draw(st.integers(1, 7), label="limit")
    body["limit"] = limit
    descending = data.draw(st.booleans(), label="descending")
    if descending:
        body["order"] = "desc"

    def wanted(v: dict[str, Any]) -> bool:
        when = v[_time_field(kind)]
        return (
            v["symbol"] in asked
            and (resolution is None or v["resolution"] == resolution)
            and (start is None or when >= start)
            and (end is None or when < end)
        )

    expected = sorted(
        (v for v in table.values() if wanted(v)),
        key=lambda v: sort_key(kind, _row(kind, v)),
        reverse=descending,
    )

    got: list[dict[str, Any]] = []
    pages = 0
    while True:
        reply, headers = await _request(client, f"mdp.store.query.{kind}", body, fmt)
        assert "Nats-Service-Error-Code" not in headers, headers
        assert len(reply["records"]) <= limit
        got += [_parse(kind, r) for r in reply["records"]]
        pages += 1
        assert pages <= len(expected) + 2, "paging does not end"
        if reply["next_cursor"] is None:
            break
        assert reply["records"], "a page with a cursor must hold records"
        body["cursor"] = reply["next_cursor"]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert _same(a, b), (a, b)

    # latest: the record with the greatest sort key per symbol (bars: and resolution)
    latest_body: dict[str, Any] = {"symbol": asked}
    if resolution is not None:
        latest_body["resolution"] = resolution
    reply, headers = await _request(client, f"mdp.store.latest.{kind}", latest_body, fmt)
    assert "Nats-Service-Error-Code" not in headers, headers
    best: dict[tuple[str, ...], dict[str, Any]] = {}
    for v in table.values():
        if v["symbol"] in asked and (resolution is None or v["resolution"] == resolution):
            group = (v["symbol"], v["resolution"]) if kind == "bars" else (v["symbol"],)
            if group not in best or sort_key(kind, _row(kind, v)) > sort_key(
                kind, _row(kind, best[group])
            ):
                best[group] = v
    order = list(dict.fromkeys(asked))
    want = sorted(
        best.values(),
        key=lambda v: (
            order.index(v["symbol"]),
            v["resolution"].encode() if kind == "bars" else b"",
        ),
    )
    latest = [_parse(kind, r) for r in reply["records"]]
    assert len(latest) == len(want)
    for a, b in zip(latest, want, strict=True):
        assert _same(a, b), (a, b)


def _bar(symbol: str, when: datetime, resolution: str = "1m") -> dict[str, Any]:
    return {
        "symbol": symbol,
        "ts": when.isoformat(),
        "open": "1.5",
        "high": "2",
        "low": "1",
        "close": "1.75",
        "volume": "100",
        "resolution": resolution,
    }


def _bad(case: str, subject: str, body: bytes, reason: str, ctype: str | None = None) -> Any:
    return pytest.param(subject, body, {"Content-Type": ctype} if ctype else {}, reason, id=case)


Q = "mdp.store.query.bars"
BAD_REQUESTS = [
    _bad("unknown kind", "mdp.store.query.ticks", b'{"symbol": "A"}', "unknown_kind"),
    _bad("unknown kind, latest", "mdp.store.latest.ticks", b'{"symbol": "A"}', "unknown_kind"),
    _bad(
        "end before start",
        Q,
        b'{"symbol": "A", "start": "2024-01-02T00:00:00Z", "end": "2024-01-01T00:00:00Z"}',
        "invalid_range",
    ),
    _bad(
        "end equal to start",
        Q,
        b'{"symbol": "A", "start": 1704067200, "end": "2024-01-01T00:00:00Z"}',
        "invalid_range",
    ),
    _bad("huge limit", Q, b'{"symbol": "A", "limit": 10000000}', "limit_too_large"),
    _bad("zero limit", Q, b'{"symbol": "A", "limit": 0}', "invalid_limit"),
    _bad("garbage cursor", Q, b'{"symbol": "A", "cursor": "%%%"}', "bad_cursor"),
    _bad("cursor of nothing", Q, b'{"symbol": "A", "cursor": "AAAA"}', "bad_cursor"),
    _bad("symbol of the wrong type", Q, b'{"symbol": 5}', "invalid_request"),
    _bad("limit of the wrong type", Q, b'{"symbol": "A", "limit": "10"}', "invalid_request"),
    _bad("start of the wrong type", Q, b'{"symbol": "A", "start": [1]}', "invalid_request"),
    _bad("not a time", Q, b'{"symbol": "A", "start": "yesterday"}', "invalid_request"),
    _bad(
        "time out of range", Q, b'{"symbol": "A", "start": "1800-01-01T00:00:00Z"}', "invalid_time"
    ),
    _bad("unknown field", Q, b'{"symbols": ["A"]}', "invalid_request"),
    _bad("unknown order", Q, b'{"symbol": "A", "order": "up"}', "invalid_request"),
    _bad("missing symbol", Q, b'{"limit": 5}', "invalid_request"),
    _bad("empty symbol list", Q, b'{"symbol": []}', "invalid_request"),
    _bad("padded symbol", Q, b'{"symbol": " A"}', "invalid_symbol"),
    _bad(
        "too many symbols",
        Q,
        json.dumps({"symbol": [f"S{i}" for i in range(101)]}).encode(),
        "too_many_symbols",
    ),
    _bad(
        "resolution for trades",
        "mdp.store.query.trades",
        b'{"symbol": "A", "resolution": "1m"}',
        "invalid_request",
    ),
    _bad("malformed JSON", Q, b'{"symbol": ', "malformed_request"),
    _bad("not an object", Q, b"[1, 2]", "invalid_request"),
    _bad("empty body", "mdp.store.latest.bars", b"", "malformed_request"),
    _bad("malformed MessagePack", Q, b"\xc1", "malformed_request", "application/msgpack"),
    _bad(
        "MessagePack text not UTF-8",
        Q,
        b"\x81\xa6symbol\xa1\xff",
        "malformed_request",
        "application/msgpack",
    ),
    _bad("unsupported content type", Q, b'{"symbol": "A"}', "unsupported_content_type", "text/csv"),
    _bad(
        "oversize request",
        Q,
        b'{"symbol": "A", "cursor": "' + b"A" * 70_000 + b'"}',
        "oversize_request",
    ),
    _bad(
        "deep nesting",
        Q,
        b'{"symbol": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "invalid_request",
    ),
]


@pytest.mark.parametrize(("subject", "body", "headers", "reason"), BAD_REQUESTS)
async def test_bad_requests_get_a_400_with_a_specific_reason(
    service: StoreService,
    client: NATS,
    subject: str,
    body: bytes,
    headers: dict[str, str],
    reason: str,
) -> None:
    endpoint = subject.split(".")[2]
    before = service.stats.queries[f"{endpoint}:{reason}"]
    msg = await client.request(subject, body, headers=headers or None, timeout=10)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "400"
    assert msg.headers["Nats-Service-Error"].startswith(reason + ": ")
    decode = msgspec.msgpack.decode if "msgpack" in str(headers) else json.loads
    error = decode(msg.data)
    assert error["error"] == reason
    assert error["detail"]
    assert service.stats.queries[f"{endpoint}:{reason}"] == before + 1
    # The service goes on answering (and storing).
    ok = await client.request(
        "mdp.store.write.bars", json.dumps(_bar("OK", TIMES[2])).encode(), timeout=10
    )
    assert json.loads(ok.data)["accepted"] == 1
    reply, hdrs = await _request(client, "mdp.store.query.bars", {"symbol": "OK"})
    assert "Nats-Service-Error-Code" not in hdrs
    assert [r["symbol"] for r in reply["records"]] == ["OK"]


async def test_a_cursor_only_continues_its_own_query(service: StoreService, client: NATS) -> None:
    bars = [_bar("C", datetime(2024, 1, 2, 9, m, tzinfo=UTC)) for m in range(5)]
    reply = await client.request("mdp.store.write.bars", json.dumps(bars).encode(), timeout=10)
    assert json.loads(reply.data)["accepted"] == 5
    first, _ = await _request(client, "mdp.store.query.bars", {"symbol": "C", "limit": 2})
    cursor = first["next_cursor"]
    assert isinstance(cursor, str)
    for other in (
        {"symbol": "D", "cursor": cursor},
        {"symbol": "C", "start": "2024-01-02T09:01:00Z", "cursor": cursor},
        {"symbol": "C", "resolution": "1m", "cursor": cursor},
        {"symbol": "C", "order": "desc", "cursor": cursor},
    ):
        msg = await client.request("mdp.store.query.bars", json.dumps(other).encode(), timeout=10)
        assert msg.headers is not None
        assert msg.headers["Nats-Service-Error-Code"] == "400"
        assert msg.headers["Nats-Service-Error"].startswith("bad_cursor: ")
    msg = await client.request(
        "mdp.store.query.trades", json.dumps({"symbol": "C", "cursor": cursor}).encode(), timeout=10
    )
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error"].startswith("bad_cursor")
    # The limit may change from page to page.
    rest, _ = await _request(
        client, "mdp.store.query.bars", {"symbol": "C", "limit": 10, "cursor": cursor}
    )
    assert [r["ts"] for r in first["records"] + rest["records"]] == [
        b["ts"].replace("+00:00", "Z") for b in bars
    ]
    assert rest["next_cursor"] is None


async def _write_many(client: NATS, kind: str, records: list[dict[str, Any]]) -> None:
    for at in range(0, len(records), 1000):
        chunk = records[at : at + 1000]
        payload = json.dumps(chunk).encode()
        reply = await client.request(f"mdp.store.write.{kind}", payload, timeout=30)
        assert json.loads(reply.data)["accepted"] == len(chunk)


async def _write_slow_bars(client: NATS, symbol: str) -> None:
    """60,000 one-minute-apart bars of ``symbol`` in three resolutions: a query for
    them without a resolution sorts all of them (tens of milliseconds)."""
    base = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    resolutions = ["1m", "5m", "1h"]
    await _write_many(
        client,
        "bars",
        [_bar(symbol, datetime.fromtimestamp(base + 60 * i, UTC), resolutions[i % 3])
         for i in range(60_000)],
    )  # fmt: skip


async def test_a_query_past_its_deadline_gets_a_504_and_the_service_goes_on(
    store: StoreService, client: NATS
) -> None:
    # 60,000 bars of one symbol in three resolutions: ordering them by time needs
    # a sort of all of them, far longer than the 2 ms allowed below.
    await _write_slow_bars(client, "SLOW")
    body = json.dumps({"symbol": "SLOW", "limit": 10}).encode()
    ok = await client.request("mdp.store.query.bars", body, timeout=30)
    assert not (ok.headers or {}).get("Nats-Service-Error-Code")
    assert len(json.loads(ok.data)["records"]) == 10

    store.settings = store.settings.model_copy(update={"query_timeout_s": 0.002})
    msg = await client.request("mdp.store.query.bars", body, timeout=30)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "504", msg.headers
    assert msg.headers["Nats-Service-Error"].startswith("query_timeout: ")
    assert store.stats.queries["query:query_timeout"] == 1

    # The reader was not left broken, and ingest goes on.
    store.settings = store.settings.model_copy(update={"query_timeout_s": 30.0})
    reply = await client.request(
        "mdp.store.write.bars", json.dumps(_bar("AFTER", TIMES[2])).encode(), timeout=10
    )
    assert json.loads(reply.data)["accepted"] == 1
    again, _ = await _request(client, "mdp.store.latest.bars", {"symbol": ["AFTER", "SLOW"]})
    assert [(r["symbol"], r["resolution"]) for r in again["records"]] == [
        ("AFTER", "1m"), ("SLOW", "1h"), ("SLOW", "1m"), ("SLOW", "5m"),
    ]  # fmt: skip


async def test_a_page_is_cut_to_fit_the_servers_maximum_payload(
    service: StoreService, client: NATS
) -> None:
    # 3,000 trades with long condition lists: far more than 1 MB as one page.
    base = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    trade = {"symbol": "BIG", "price": "1.25", "conditions": [f"cond-{j:03d}" for j in range(24)]}
    await _write_many(
        client,
        "trades",
        [{**trade, "ts": datetime.fromtimestamp(base + i, UTC).isoformat(), "size": i}
         for i in range(3000)],
    )  # fmt: skip
    body: dict[str, Any] = {"symbol": "BIG", "limit": 10_000}
    sizes = []
    seen = 0
    while True:
        msg = await client.request("mdp.store.query.trades", json.dumps(body).encode(), timeout=30)
        assert len(msg.data) <= client.max_payload
        page = json.loads(msg.data)
        sizes.append(len(page["records"]))
        seen += len(page["records"])
        if page["next_cursor"] is None:
            break
        body["cursor"] = page["next_cursor"]
    assert seen == 3000
    assert len(sizes) > 1  # cut short by size, not by the limit


async def _cli(nats_url: str, *args: str) -> tuple[int, str, str]:
    # The service runs on this event loop: the command must not block it.
    base = {k: v for k, v in os.environ.items() if not k.startswith("STORE_")}
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "store-svc"),
        "query",
        *args,
        env={**base, "STORE_NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_query_command_prints_pages_as_json_lines_or_a_table(
    service: StoreService, client: NATS
) -> None:
    url = service.settings.nats_url
    bars = [_bar("CLI", datetime(2024, 1, 2, 9, m, tzinfo=UTC)) for m in range(5)]
    reply = await client.request("mdp.store.write.bars", json.dumps(bars).encode(), timeout=10)
    assert json.loads(reply.data)["accepted"] == 5

    code, out, err = await _cli(url, "bars", "CLI", "--limit", "3", "--format", "jsonl")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["ts"] for r in lines] == [b["ts"].replace("+00:00", "Z") for b in bars[:3]]
    assert "3 record(s)" in err

    # --limit 0: every page (two here; the command follows the reply cursors).
    code, out, err = await _cli(
        url, "bars", "CLI", "--limit", "0", "--start", "2024-01-02T09:01:00Z"
    )
    assert code == 0, err
    head, rule, *rows = out.splitlines()
    assert head.split() == ["symbol", "ts", "open", "high", "low", "close", "volume",
                            "resolution", "delayed"]  # fmt: skip
    assert set(rule) == {"-", " "}
    assert [r.split()[1] for r in rows] == [b["ts"].replace("+00:00", "Z") for b in bars[1:]]

    code, out, err = await _cli(
        url, "bars", "CLI", "--newest-first", "--limit", "2", "--format", "jsonl"
    )
    assert code == 0, err
    assert [json.loads(line)["ts"] for line in out.splitlines()] == [
        "2024-01-02T09:04:00Z", "2024-01-02T09:03:00Z",
    ]  # fmt: skip

    code, out, err = await _cli(url, "bars", "CLI", "NONE", "--latest", "--format", "jsonl")
    assert code == 0, err
    assert [json.loads(line)["ts"] for line in out.splitlines()] == ["2024-01-02T09:04:00Z"]

    code, out, err = await _cli(
        url, "bars", "CLI", "--start", "2024-01-02T00:00:00Z", "--end", "1704153600"
    )
    assert code == 1
    assert "400 invalid_range" in err


@pytest.mark.logic
@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_records_are_printed_exactly_as_core_prints_them(kind: str, data: st.DataObject) -> None:
    spec = KINDS[kind]
    record = data.draw(BY_KIND[kind])
    when = data.draw(st.sampled_from(TIMES))
    row = _row(kind, _values(kind, record, when))
    fields = [[n, spec.columns.index(n), "t" if n in spec.time_columns else "-"]
              for n in core_fields(kind)]  # fmt: skip
    printed = encoder_for("json")(compile_readout(fields)(row))
    expected = spec.to_core(row).model_dump_json().encode()
    if kind == "options":  # the store adds its ts at the end
        assert printed == expected[:-1] + b',"ts":"' + rfc3339(when).encode() + b'"}'
    else:
        assert printed == expected
    assert msgspec.msgpack.decode(encoder_for("msgpack")(compile_readout(fields)(row))) == (
        json.loads(printed)
    )


async def test_read_api_counts_show_in_metrics_and_service_stats(
    make_settings: Callable[..., Settings], client: NATS
) -> None:
    async with StoreService(make_settings(metrics_port=0)) as svc:
        await _write_many(client, "bars", [_bar("M", TIMES[2])])
        for _ in range(2):
            await _request(client, "mdp.store.query.bars", {"symbol": "M"})
        await _request(client, "mdp.store.latest.bars", {"symbol": "M"})
        await client.request("mdp.store.query.bars", b'{"symbol": 1}', timeout=10)
        assert svc.metrics.port
        m = await asyncio.to_thread(scrape, svc.metrics.port)
        assert m[("store_queries_total", (("endpoint", "query"), ("outcome", "ok")))] == 2
        assert m[("store_queries_total", (("endpoint", "latest"), ("outcome", "ok")))] == 1
        invalid = (("endpoint", "query"), ("outcome", "invalid_request"))
        assert m[("store_queries_total", invalid)] == 1
        assert m[("store_query_records_total", ())] == 3
        assert m[("store_query_seconds_count", (("endpoint", "query"),))] == 2
        stats = await client.request("$SRV.STATS.market-data-store", b"", timeout=5)
        data = json.loads(stats.data)["endpoints"][0]["data"]
        assert data["queries"] == 3
        assert data["query_errors"] == 1


async def test_a_killed_reader_process_is_replaced(service: StoreService, client: NATS) -> None:
    await _write_many(client, "bars", [_bar("K", TIMES[2])])
    reader = service.query._reader if service.query else None
    assert isinstance(reader, SqliteReader)
    pids = [w.proc.pid for w in reader._all if w.proc is not None]
    assert len(pids) == service.settings.query_concurrency
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await until(lambda: not any(w.running for w in reader._all))
    reply, headers = await _request(client, "mdp.store.query.bars", {"symbol": "K"})
    assert "Nats-Service-Error-Code" not in headers
    assert [r["symbol"] for r in reply["records"]] == ["K"]
    assert all(w.proc is None or w.proc.pid not in pids for w in reader._all)


async def test_a_flood_of_queries_gets_503_busy_beyond_the_backlog(
    service: StoreService, client: NATS
) -> None:
    await _write_slow_bars(client, "FLOOD")
    # Each of these sorts 60,000 bars; 2 readers x 32 waiting is the backlog.
    body = json.dumps({"symbol": "FLOOD", "limit": 1}).encode()
    replies = await asyncio.gather(
        *(client.request("mdp.store.query.bars", body, timeout=60) for _ in range(120))
    )
    codes = [(r.headers or {}).get("Nats-Service-Error-Code", "ok") for r in replies]
    assert codes.count("503") >= 40  # about 120 - 64: a few may finish while it floods
    assert set(codes) == {"ok", "503"}
    assert service.stats.queries["query:busy"] == codes.count("503")
    # Without a reply subject nothing can be answered: counted, not run.
    await client.publish("mdp.store.latest.bars", b'{"symbol": "FLOOD"}')
    await until(lambda: service.stats.queries["latest:no_reply_subject"] == 1)


async def test_an_unexpected_failure_costs_one_reply_not_the_service(
    service: StoreService, client: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service.query is not None
    reader = service.query._reader

    async def broken(*_: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(reader, "page", broken)
    msg = await client.request("mdp.store.query.bars", b'{"symbol": "X"}', timeout=10)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "500"
    assert msg.headers["Nats-Service-Error"] == "internal_error: RuntimeError; see the service log"
    monkeypatch.undo()
    reply, headers = await _request(client, "mdp.store.query.bars", {"symbol": "X"})
    assert "Nats-Service-Error-Code" not in headers
    assert reply == {"records": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("bars", [2**63, "F", "1m"]),
        ("bars", [10**18, "F", "1m"]),
        ("bars", [-(10**18), "F", "1m"]),
        ("trades", [0, "F", "1", 2**64 - 1, 0, "", "[]"]),
        ("trades", [0, "F", "1", 1, 2**40, "", "[]"]),
        ("trades", [0, "F", "1", 1, 1, "X\x00", "[]"]),
        ("options", [0, "F", 10**18, "1", "C"]),
    ],
)
async def test_forged_cursors_are_refused_before_the_database(
    store: StoreService, client: NATS, kind: str, key: list[Any]
) -> None:
    # Cursors are not signed, so anyone can build one that passes the fingerprint.
    plan = PagePlan(kind, ("F",), None, None, None, None, 10, "json")
    body = {"symbol": "F", "limit": 10, "cursor": encode_cursor(plan, key)}
    msg = await client.request(f"mdp.store.query.{kind}", json.dumps(body).encode(), timeout=10)
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "400"
    assert msg.headers["Nats-Service-Error"].startswith("bad_cursor: ")
    # The same plan's genuine cursor shape is accepted.
    good = list(key)
    good[0] = 0
    if kind == "trades":
        good[3], good[4], good[5] = 1, 1, "X"
    if kind == "options":
        good[2] = 0
    body["cursor"] = encode_cursor(plan, good)
    reply, headers = await _request(client, f"mdp.store.query.{kind}", body)
    assert "Nats-Service-Error-Code" not in headers
    assert reply == {"records": [], "next_cursor": None}


async def test_a_stuck_reader_does_not_hold_up_shutdown(
    make_settings: Callable[..., Settings],
) -> None:
    svc = StoreService(make_settings(shutdown_grace_s=5.0))
    await svc.start()
    try:
        assert svc.query is not None
        reader = svc.query._reader
        assert isinstance(reader, SqliteReader)
        stuck = reader._all[0].proc
        assert stuck is not None
        os.kill(stuck.pid, signal.SIGSTOP)
        async with asyncio.timeout(8):
            await svc.stop()
        assert stuck.returncode is not None  # killed, not waited for
    finally:
        await svc.stop()
