"""Value codecs shared by the sinks, the read API and the SQLite worker processes.

Standard library and msgspec only, so a worker process imports it and nothing else
of the service. Times travel as integer microseconds since the Unix epoch (exact,
compact, cheap to send); key Decimals as canonical text (``1.5`` and ``1.50`` are one
key, as PostgreSQL's NUMERIC compares them); trade conditions as compact JSON text.

Row plans are one character per column. Write plans (:func:`compile_converter`):
``t`` aware datetime -> int microseconds, ``k`` key Decimal text -> canonical text,
``c`` list of str -> compact JSON text, ``d`` Decimal (or None) -> its exact text, ``-``
as it comes. Read-out plans
(:func:`compile_readout`): ``T`` int microseconds -> RFC 3339 text, ``t`` aware
datetime -> RFC 3339 text, ``B`` int -> bool, ``J`` JSON text -> list, ``-`` as it
comes (msgspec writes Decimals as text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

import msgspec

__all__ = [
    "EPOCH",
    "GC_THRESHOLDS",
    "collect_page",
    "compile_converter",
    "compile_readout",
    "conditions_text",
    "encoder_for",
    "key_decimal_text",
    "rfc3339",
    "rfc3339_micros",
    "time_micros",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_encode_json = msgspec.json.encode


_pack_key = msgspec.msgpack.Encoder().encode


#: Young, middle and old generation thresholds of the cyclic garbage collector
#: (CPython's default: 700, 10, 10), for this process and the service's
#: (store_svc/runtime/heap.py has the measurements).
GC_THRESHOLDS = (10_000, 10, 10)


#: Enough precision for every Decimal the store accepts (38 digits) to stay exact.
_EXACT = Context(prec=80)


def time_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, no float)."""
    td = value - EPOCH
    return (td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds


def key_decimal_text(text: str) -> str:
    """One text per value, as NUMERIC compares in PostgreSQL: ``1.5 == 1.50``, ``-0 == 0``."""
    # Fast path: most prices arrive already canonical ("187.25", "100").
    if "E" not in text and not ("." in text and text[-1] == "0") and text != "-0":
        return text
    value = Decimal(text)
    # normalize() rounds to its context's precision: the default 28 digits would
    # merge keys that differ beyond the 28th of their up to 38 digits.
    return format(value.normalize(_EXACT), "f") if value else "0"


def conditions_text(value: list[str]) -> str:
    """Conditions as compact JSON array text."""
    return _encode_json(value).decode()


def rfc3339_micros(value: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC text, as Core's models print it."""
    return rfc3339(EPOCH + timedelta(microseconds=value))


def rfc3339(value: datetime) -> str:
    """An aware datetime as RFC 3339 UTC text (``2024-01-02T09:30:00.000001Z``)."""
    if value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat() + "Z"


def compile_readout(fields: list[list[Any]]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """Build a function turning one stored row into a Core record's JSON values.

    Args:
        fields: ``[name, column index, plan character]`` per output field, in
            the Core model's field order.

    Returns:
        ``readout(row) -> dict`` ready for msgspec's JSON or MessagePack encoder.
    """
    names: dict[str, Any] = {
        "T": rfc3339_micros,
        "t": rfc3339,
        "B": bool,
        "J": _decode_json,
    }
    parts = []
    for name, index, code in fields:
        value = f"r[{int(index)}]" if code == "-" else f"{code}(r[{int(index)}])"
        if code != "-":
            value = f"(None if r[{int(index)}] is None else {value})"
        parts.append(f"{str(name)!r}: {value}")
    source = f"def readout(r):\n    return {{{', '.join(parts)}}}\n"
    exec(compile(source, "<readout>", "exec"), names)
    return names["readout"]  # type: ignore[no-any-return]


def encoder_for(fmt: str) -> Callable[[Any], bytes]:
    """The encoder of a reply format (``json`` or ``msgpack``)."""
    return msgspec.msgpack.encode if fmt == "msgpack" else _encode_json


def collect_page(
    rows: Sequence[Sequence[Any]],
    readout: Callable[[Sequence[Any]], dict[str, Any]],
    encode: Callable[[Any], bytes],
    key_start: int,
    limit: int,
    budget: int,
) -> tuple[list[bytes], list[Any] | None]:
    """Encode up to ``limit`` rows within ``budget`` bytes.

    Args:
        rows: up to ``limit + 1`` rows: the record columns, then the sort key from
            column ``key_start`` on.
        readout: see :func:`compile_readout`.
        encode: the reply format's encoder.
        key_start: where the sort key starts in a row.
        limit: the page size asked for.
        budget: bytes the encoded records and the cursor may take (the first record
            is always taken).

    Returns:
        The encoded records, and the sort key of the last one when more follow
        (``None`` at the end of the results).
    """
    out: list[bytes] = []
    used = 0
    for row in rows[:limit]:
        body = encode(readout(row))
        used += len(body) + 1
        # Should the page end here, its cursor (this row's key, MessagePack in
        # base64) must fit too; keys hold free text (exchange, conditions).
        cursor = len(_pack_key(list(row[key_start:]))) * 4 // 3 + 64
        if out and used + cursor > budget:
            break
        out.append(body)
    if len(out) < len(rows):
        return out, list(rows[len(out) - 1][key_start:])
    return out, None


def compile_converter(
    plan: str, *, append_ingested_at: bool = True
) -> Callable[..., tuple[Any, ...]]:
    """Build a function turning one row into SQLite parameters.

    Written out per plan once, so the per-row cost is one call with no loop over
    columns.

    Args:
        plan: one character per column (see the module docstring).
        append_ingested_at: whether the function takes ``ingested_at`` and appends it.

    Returns:
        ``convert(row, ingested_at) -> tuple`` (or ``convert(row)``).
    """
    names: dict[str, Any] = {
        "T": time_micros,
        "K": key_decimal_text,
        "C": conditions_text,
        "S": str,
    }
    parts = []
    for i, code in enumerate(plan):
        parts.append(
            {
                "t": f"T(r[{i}])",
                "k": f"K(r[{i}])",
                "c": f"C(r[{i}])",
                "d": f"(None if r[{i}] is None else S(r[{i}]))",
            }.get(code, f"r[{i}]")
        )
    if append_ingested_at:
        source = f"def convert(r, ingested_at):\n    return ({', '.join(parts)}, ingested_at)\n"
    else:
        source = f"def convert(r):\n    return ({', '.join(parts)},)\n"
    exec(compile(source, f"<sqlite converter {plan}>", "exec"), names)
    return names["convert"]  # type: ignore[no-any-return]


def _decode_json(text: str) -> Any:
    return msgspec.json.decode(text)
