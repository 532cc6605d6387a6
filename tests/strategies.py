"""Hypothesis strategies that build valid Core records (within the store's bounds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import strategies as st

from store_svc.core import Bar, OptionSnapshot, Quote, Trade

symbols = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp")
    ),
    min_size=1,
    max_size=12,
)

# Exact decimals of every shape a feed sends: integers, cents, long fractions, tiny greeks.
decimals = st.one_of(
    st.decimals(min_value=-(10**12), max_value=10**12, places=2, allow_nan=False),
    st.decimals(min_value=-(10**6), max_value=10**6, places=9, allow_nan=False),
    st.integers(min_value=-(10**18), max_value=10**18).map(Decimal),
    st.builds(
        lambda digits, exp: Decimal(digits).scaleb(exp),
        st.integers(min_value=1, max_value=10**20),
        st.integers(min_value=-28, max_value=4),
    ),
)
sizes = st.integers(min_value=0, max_value=2**63 - 1)
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))])
times = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2026, 1, 1), timezones=zones
)
expiries = st.datetimes(
    min_value=datetime(1900, 1, 2), max_value=datetime(2199, 12, 30), timezones=zones
)
words = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@-", min_size=0, max_size=6)

bars = st.builds(
    Bar,
    symbol=symbols,
    ts=times,
    open=decimals,
    high=decimals,
    low=decimals,
    close=decimals,
    volume=decimals,
    resolution=st.sampled_from(["1s", "1m", "5m", "1h", "1d"]),
    delayed=st.booleans(),
)
trades = st.builds(
    Trade,
    symbol=symbols,
    ts=times,
    price=decimals,
    size=sizes,
    exchange=st.none() | words,
    conditions=st.lists(words, max_size=4),
)
quotes = st.builds(
    Quote,
    symbol=symbols,
    bid=st.none() | decimals,
    ask=st.none() | decimals,
    last=st.none() | decimals,
    bid_size=st.none() | sizes,
    ask_size=st.none() | sizes,
    volume=sizes,
    timestamp=times,
    delayed=st.booleans(),
)
options = st.builds(
    OptionSnapshot,
    symbol=symbols,
    expiry=expiries,
    strike=decimals,
    option_type=st.sampled_from(["C", "P"]),
    bid=st.none() | decimals,
    ask=st.none() | decimals,
    last=st.none() | decimals,
    volume=sizes,
    open_interest=sizes,
    implied_volatility=st.none() | decimals,
    delta=st.none() | decimals,
    gamma=st.none() | decimals,
    theta=st.none() | decimals,
    vega=st.none() | decimals,
    delayed=st.booleans(),
)

BY_KIND = {"bars": bars, "trades": trades, "quotes": quotes, "options": options}


def as_utc(value: datetime) -> datetime:
    """Naive means UTC; aware times are converted to UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
