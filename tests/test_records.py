"""Pure logic of the record checks that have a fast path."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store_svc.constants import MAX_DECIMAL_ADJUSTED_EXPONENT, MAX_DECIMAL_DIGITS
from store_svc.errors import RejectedInput
from store_svc.ingest.records import check_decimal

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
