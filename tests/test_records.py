"""Pure logic of the record checks that have a fast path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store_svc.constants import MAX_DECIMAL_ADJUSTED_EXPONENT, MAX_DECIMAL_DIGITS
from store_svc.errors import RejectedInput
from store_svc.ingest import records
from store_svc.ingest.records import (
    EARLIEST,
    LATEST_EXPIRY,
    MIRRORS,
    BarRecord,
    OptionRecord,
    QuoteRecord,
    RowContext,
    TradeRecord,
    check_decimal,
    check_int64,
    check_symbol,
    check_text,
    to_utc,
)

pytestmark = pytest.mark.logic


def within_bounds(value: Decimal) -> bool:
    """The rule of docs/protocol.md, written the slow, obvious way."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    return (
        exponent >= -MAX_DECIMAL_ADJUSTED_EXPONENT
        and len(digits) + exponent <= MAX_DECIMAL_ADJUSTED_EXPONENT + 1
        and len(digits) <= MAX_DECIMAL_DIGITS
    )


def accepted(value: Decimal) -> bool:
    try:
        check_decimal(value, "price")
    except RejectedInput as exc:
        reason = exc.reason
    else:
        return True
    assert reason == "number_out_of_range"
    return False


EDGES = [
    "0",
    "-0",
    "0E-30",
    "0E-31",
    "1E+30",
    "1E+31",
    "9" * 31,
    "9" * 32,
    "0." + "0" * 28 + "1",
    "0." + "0" * 29 + "1",
    "0." + "0" * 30 + "1",
    "1." + "0" * 29,
    "1." + "0" * 30,
    "-" + "9" * 30 + ".5",
    "1" * 38 + "E-30",
    "1" * 39 + "E-30",
    "123.4500",
    "-187.25",
]


@pytest.mark.parametrize("text", EDGES)
def test_edges_follow_the_rule(text: str) -> None:
    value = Decimal(text)
    assert accepted(value) == within_bounds(value), text


@given(
    st.builds(
        lambda sign, digits, exponent: Decimal((sign, digits, exponent)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=45).map(tuple),
        st.integers(-40, 40),
    )
)
def test_generated_values_follow_the_rule(value: Decimal) -> None:
    assert accepted(value) == within_bounds(value)


# The row functions test each value cheaply first and call the full check only when
# that test fails. Their outcome must be the full checks' own: the same row, or the
# same reject with the same reason and detail. The reference below calls every
# check on every field, in column order, the slow, obvious way.

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
LATEST = NOW + timedelta(seconds=5)


def reference_row(kind: str, r: Any, ctx: RowContext) -> tuple[Any, ...]:
    def dec(v: Decimal | None, name: str) -> Decimal | None:
        return None if v is None else check_decimal(v, name)

    def i64(v: int | None, name: str) -> int | None:
        return None if v is None else check_int64(v, name)

    sym = check_symbol(r.symbol, ctx)
    if kind == "bars":
        return (
            sym,
            check_text(r.resolution, "resolution"),
            to_utc(r.ts, "ts", ctx.latest, ctx.earliest),
            *(dec(getattr(r, f), f) for f in ("open", "high", "low", "close", "volume")),
            r.delayed,
        )
    if kind == "trades":
        ts = to_utc(r.ts, "ts", ctx.latest, ctx.earliest)
        price, size = dec(r.price, "price"), i64(r.size, "size")
        exchange = None if r.exchange is None else check_text(r.exchange, "exchange")
        for c in r.conditions:
            check_text(c, "conditions")
        return (sym, ts, price, size, exchange, tuple(r.conditions))
    if kind == "quotes":
        ts = to_utc(r.timestamp, "timestamp", ctx.latest, ctx.earliest)
        prices = [dec(getattr(r, f), f) for f in ("bid", "ask", "last")]
        sizes = [i64(getattr(r, f), f) for f in ("bid_size", "ask_size", "volume")]
        return (sym, ts, *prices, *sizes, r.delayed)
    expiry = to_utc(r.expiry, "expiry", LATEST_EXPIRY)
    strike = dec(r.strike, "strike")
    prices = [dec(getattr(r, f), f) for f in ("bid", "ask", "last")]
    counts = [i64(r.volume, "volume"), i64(r.open_interest, "open_interest")]
    greeks = [
        dec(getattr(r, f), f) for f in ("implied_volatility", "delta", "gamma", "theta", "vega")
    ]
    return (sym, expiry, strike, r.option_type, ctx.option_ts, *prices, *counts, *greeks, r.delayed)


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("row", fn(*args))
    except RejectedInput as exc:
        return ("reject", (exc.reason, exc.detail))


hostile_symbols = st.one_of(
    st.sampled_from(["AAPL", "MSFT", "", " AAPL", "AA\x00PL", "A\u200bB", "X" * 80]),
    st.text(max_size=6),
)
hostile_decimals = st.one_of(
    st.sampled_from(["189.25", "NaN", "-Infinity", "sNaN", "1E+31", "1E+5", "0E-31"]).map(Decimal),
    st.builds(
        lambda sign, digits, exponent: Decimal((sign, digits, exponent)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=45).map(tuple),
        st.integers(-40, 40),
    ),
)
hostile_times = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))]),
    ),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from([NOW, NOW - timedelta(days=3), LATEST + timedelta(seconds=1)]),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=True, allow_infinity=True),
)
hostile_ints = st.integers(-(2**64), 2**64)
hostile_texts = st.sampled_from(["XNAS", "", "X\x00"]) | st.text(max_size=3)


def hostile(kind: str) -> st.SearchStrategy[Any]:
    opt_dec = st.none() | hostile_decimals
    if kind == "bars":
        return st.builds(
            BarRecord,
            symbol=hostile_symbols,
            ts=hostile_times,
            open=hostile_decimals,
            high=hostile_decimals,
            low=hostile_decimals,
            close=hostile_decimals,
            volume=hostile_decimals,
            resolution=hostile_texts,
        )
    if kind == "trades":
        return st.builds(
            TradeRecord,
            symbol=hostile_symbols,
            ts=hostile_times,
            price=hostile_decimals,
            size=hostile_ints,
            exchange=st.none() | hostile_texts,
            conditions=st.lists(hostile_texts, max_size=3),
        )
    if kind == "quotes":
        return st.builds(
            QuoteRecord,
            symbol=hostile_symbols,
            timestamp=hostile_times,
            bid=opt_dec,
            ask=opt_dec,
            last=opt_dec,
            bid_size=st.none() | hostile_ints,
            ask_size=st.none() | hostile_ints,
            volume=hostile_ints,
        )
    return st.builds(
        OptionRecord,
        symbol=hostile_symbols,
        expiry=hostile_times,
        strike=hostile_decimals,
        option_type=st.sampled_from(["C", "P"]),
        bid=opt_dec,
        ask=opt_dec,
        last=opt_dec,
        implied_volatility=opt_dec,
        delta=opt_dec,
        gamma=opt_dec,
        theta=opt_dec,
        vega=opt_dec,
        volume=hostile_ints,
        open_interest=hostile_ints,
    )


@pytest.mark.parametrize("kind", list(MIRRORS))
@given(data=st.data())
def test_row_functions_agree_with_every_check(kind: str, data: st.DataObject) -> None:
    record = data.draw(hostile(kind))
    subject_symbol = data.draw(st.sampled_from([None, "AAPL", record.symbol]))
    earliest = data.draw(st.sampled_from([EARLIEST, NOW - timedelta(days=1)]))
    ctx = RowContext(LATEST, subject_symbol, NOW, earliest)
    want = outcome(reference_row, kind, record, ctx)
    got = outcome(MIRRORS[kind].to_row, record, ctx)
    assert got == want
    # Twice: the second call may take the fast path for a symbol seen valid.
    assert outcome(MIRRORS[kind].to_row, record, ctx) == want


def test_known_symbols_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_KNOWN_LIMIT", 10)
    records._known_symbols.clear()
    ctx = RowContext(LATEST, None, NOW)
    for i in range(25):
        trade = TradeRecord(f"S{i}", NOW, Decimal("1.5"), 1)
        assert records.trade_row(trade, ctx)[0] == f"S{i}"
        assert len(records._known_symbols) <= 10
    # A symbol seen valid still meets the subject's token.
    with pytest.raises(RejectedInput) as exc:
        records.trade_row(TradeRecord("S24", NOW, Decimal("1.5"), 1), RowContext(LATEST, "X", NOW))
    assert exc.value.reason == "symbol_mismatch"
