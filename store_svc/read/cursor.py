"""Read API cursors: where the next page starts, opaque to clients.

A cursor is URL-safe base64 of MessagePack ``[1, kind, fingerprint, sort key]``.
The sort key is that of the last record sent, so the next page starts strictly
after it (keyset paging). The fingerprint ties a cursor to its query (kind,
symbols, resolution, start, end, order). Cursors are not signed: a key the store
can never have issued is refused (``bad_cursor``) rather than sent to the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import msgspec

from store_svc.constants import INT64_MAX, INT64_MIN
from store_svc.errors import BadQuery
from store_svc.ingest.records import EARLIEST, LATEST_EXPIRY, time_bound
from store_svc.store.reads import KEY_TIMES, KEY_TYPES, PagePlan

__all__ = ["decode_cursor", "encode_cursor"]

#: Times a cursor may hold, in microseconds: stored times lie in [1900, 2200].
CURSOR_EARLIEST = time_bound(EARLIEST, "cursor")

CURSOR_LATEST = time_bound(LATEST_EXPIRY, "cursor")

_pack = msgspec.msgpack.Encoder().encode

_unpack = msgspec.msgpack.Decoder().decode


def _fingerprint(plan: PagePlan) -> bytes:
    what = [plan.kind, list(plan.symbols), plan.resolution, plan.start, plan.end, plan.descending]
    return hashlib.blake2b(_pack(what), digest_size=8).digest()


def encode_cursor(plan: PagePlan, key: list[int | str]) -> str:
    """The cursor of the page after the record whose sort key is ``key``.

    Args:
        plan: the page just answered.
        key: the sort key of its last record.

    Returns:
        Opaque URL-safe text.
    """
    body = _pack([1, plan.kind, _fingerprint(plan), key])
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def decode_cursor(plan: PagePlan, cursor: str) -> tuple[int | str, ...]:
    """Check a cursor against the query it is sent with and return its sort key.

    Args:
        plan: the query (its ``after`` is ignored).
        cursor: the text a previous reply gave as ``next_cursor``.

    Returns:
        The sort key to continue after.

    Raises:
        BadQuery: ``bad_cursor``.
    """
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = _unpack(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeEncodeError, binascii.Error, msgspec.DecodeError):
        raise BadQuery("bad_cursor", "the cursor is not one this service issued") from None
    if not (isinstance(data, list) and len(data) == 4 and data[0] == 1):
        raise BadQuery("bad_cursor", "the cursor is not one this service issued")
    _, kind, fingerprint, key = data
    if kind != plan.kind or fingerprint != _fingerprint(plan):
        raise BadQuery(
            "bad_cursor",
            "the cursor belongs to another query: kind, symbol, resolution, start and end "
            "must stay as they were for the first page",
        )
    types = KEY_TYPES[plan.kind]
    if not (
        isinstance(key, list)
        and len(key) == len(types)
        and all(type(v) is t for v, t in zip(key, types, strict=True))
        and _plausible(plan.kind, key)
    ):
        raise BadQuery("bad_cursor", "the cursor is not one this service issued")
    return tuple(key)


def _plausible(kind: str, key: list[int | str]) -> bool:
    # Cursors are not signed: values the store can never have issued (times outside
    # [1900, 2200], integers beyond int64, a flag that is not 0 or 1, NUL in text)
    # are refused here rather than failing in the database.
    times = KEY_TIMES[kind]
    for i, value in enumerate(key):
        if isinstance(value, str):
            if "\x00" in value:
                return False
        elif i in times:
            if not CURSOR_EARLIEST <= value <= CURSOR_LATEST:
                return False
        elif not INT64_MIN <= value <= INT64_MAX:
            return False
    return kind != "trades" or key[4] in (0, 1)
