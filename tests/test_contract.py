"""Contract: the msgspec mirrors accept and produce exactly what Core's models do.

Three layers: the Core JSON schemas match the checked-in snapshots (so a Core
upgrade that changes the wire fails here with a readable diff); the mirrors have
Core's fields, types, required set and defaults; and on generated inputs, valid and
mutated, the store's decoder accepts what Core accepts with the same values, and
rejects what Core rejects.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from store_svc.ingest.decode import PayloadDecoder
from store_svc.ingest.records import MIRRORS, Time
from store_svc.kinds import KINDS

from .contracts.update import HERE, MODELS, schema_text
from .strategies import BY_KIND, as_utc

pytestmark = pytest.mark.logic

# Checks the store adds on top of Core; a record Core accepts may fail only these.
STORE_ONLY_REASONS = {
    "invalid_symbol",
    "invalid_text",
    "timestamp_out_of_range",
    "number_out_of_range",
}
RECEIVED = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_core_schema_matches_snapshot(name: str) -> None:
    expected = (HERE / f"{name}.json").read_text()
    actual = schema_text(MODELS[name])
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), "snapshot", "installed Core"
        )
    )
    assert not diff, (
        f"Core's {name} schema changed; review, then run tests/contracts/update.py:\n{diff}"
    )


def _mirror_type(core_type: Any) -> Any:
    """The mirror type that stands for a Core annotation (datetime -> Time)."""
    if core_type is datetime:
        return Time
    origin = typing.get_origin(core_type)
    if origin in (types.UnionType, typing.Union):
        parts = tuple(_mirror_type(a) for a in typing.get_args(core_type))
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    return core_type


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mirror_has_core_fields_types_and_defaults(kind: str) -> None:
    spec = KINDS[kind]
    core_fields = spec.core_model.model_fields
    mirror = {f.name: f for f in msgspec.structs.fields(MIRRORS[kind].struct)}
    assert list(mirror) == list(core_fields), "field names and order"
    for name, info in core_fields.items():
        field = mirror[name]
        assert field.required == info.is_required(), f"{name}: required"
        assert field.type == _mirror_type(info.annotation), f"{name}: type"
        if info.default_factory is not None:
            assert field.default_factory is not msgspec.NODEFAULT, f"{name}: default factory"
            produced = field.default_factory()
            assert type(produced) is type(info.default_factory()), f"{name}: factory type"  # type: ignore[call-arg]
        elif not info.is_required():
            assert field.default == info.default, f"{name}: default"


def _decode_one(kind: str, payload: bytes) -> tuple[tuple[Any, ...] | None, str | None]:
    out = PayloadDecoder(1 << 20, 366 * 86400 * 10).decode(kind, None, payload, None, RECEIVED)
    if out.rows:
        return out.rows[0], None
    return None, out.rejects[0].reason


def _normalised(model: BaseModel) -> dict[str, Any]:
    values = model.model_dump()
    return {k: as_utc(v) if isinstance(v, datetime) else v for k, v in values.items()}


def _assert_same_record(kind: str, row: tuple[Any, ...], core_model: BaseModel) -> None:
    ours = _normalised(KINDS[kind].to_core(row))
    theirs = _normalised(core_model)
    assert ours == theirs


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_core_records_decode_to_the_same_values(kind: str, data: st.DataObject) -> None:
    record = data.draw(BY_KIND[kind])
    payload = record.model_dump_json().encode()
    row, reason = _decode_one(kind, payload)
    assert reason is None, reason
    assert row is not None
    _assert_same_record(kind, row, record)


# Values to put in a field: lax forms Core takes, and wrong ones it refuses.
MUTATIONS: dict[str, list[Any]] = {
    "decimal": ["12.5", 7, 0.25, "1e3", "abc", None, True, [], {}, "NaN", "-Infinity", ""],
    "int": [5, "5", 5.0, 5.5, "x", True, None, [], -1, "1e2"],
    "bool": [True, "true", "yes", 1, 0, "off", "maybe", None, 2],
    "str": ["ok", 5, None, [], True, {"a": 1}],
    "time": [
        "2024-02-03T04:05:06Z",
        "2024-02-03T04:05:06.5+02:00",
        "2024-02-03",
        "2024-02-03 04:05:06",
        1_700_000_000,
        1_700_000_000.5,
        1_700_000_000_123,
        "1700000000",
        "yesterday",
        None,
        True,
        [],
    ],
    "list": [[], ["A", "B"], ["A", 1], "A", None],
    "literal": ["C", "P", "c", "X", None, 1],
}


def _field_class(kind: str, name: str) -> str:
    spec = KINDS[kind]
    if name in spec.decimal_columns:
        return "decimal"
    if name in spec.time_columns:
        return "time"
    annotation = spec.core_model.model_fields[name].annotation
    args = set(typing.get_args(annotation)) or {annotation}
    if int in args:
        return "int"
    if bool in args:
        return "bool"
    if annotation == list[str]:
        return "list"
    if name == "option_type":
        return "literal"
    return "str"


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    record = draw(BY_KIND[kind])
    values = json.loads(record.model_dump_json())
    names = sorted(values)
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            del values[name]
        else:
            values[name] = draw(st.sampled_from(MUTATIONS[_field_class(kind, name)]))
    return values


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_store_accepts_exactly_what_core_accepts(kind: str, data: st.DataObject) -> None:
    values = data.draw(mutated(kind))
    payload = json.dumps(values).encode()
    try:
        expected: BaseModel | None = KINDS[kind].core_model.model_validate_json(payload)
    except ValidationError:
        expected = None
    row, reason = _decode_one(kind, payload)
    event(f"core {'accepts' if expected else 'refuses'}, store says {reason or 'ok'}")
    if expected is None:
        assert row is None, f"Core refused but the store accepted {values}"
        return
    if row is None:
        assert reason in STORE_ONLY_REASONS, f"Core accepted but the store said {reason}: {values}"
        return
    ours = _normalised(KINDS[kind].to_core(row))
    theirs = _normalised(expected)
    if kind == "quotes" and "timestamp" not in values:
        # Both default to "now", read at slightly different moments.
        assert abs(ours.pop("timestamp") - theirs.pop("timestamp")).total_seconds() < 60
    assert ours == theirs


def test_json_numbers_keep_every_digit_where_core_rounds() -> None:
    """The one deliberate divergence: a JSON number is read exactly, not via a float."""
    payload = (
        b'{"symbol":"A","ts":"2024-01-01T00:00:00Z","price":0.1000000000000000055511,"size":1}'
    )
    row, _ = _decode_one("trades", payload)
    assert row is not None
    assert row[2] == Decimal("0.1000000000000000055511")
    assert KINDS["trades"].core_model.model_validate_json(payload).price == Decimal("0.1")
