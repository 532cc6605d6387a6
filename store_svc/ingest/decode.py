"""Decode a write message into validated rows and per-record rejects.

The hot path decodes the whole payload at once with the kind's msgspec mirror.
Only when that fails does the decoder split the payload into its elements and
decode each on its own, so one bad record never costs its valid neighbours. A
record the strict mirror refuses is given to Core's own pydantic model, which is
laxer (``"5"`` for an int, ``"yes"`` for a bool, a date for a datetime): the store
accepts what Core accepts and rejects what Core rejects, with Core's reason.

Message-level problems (unknown kind, empty, oversize, not JSON / MessagePack, a bad
``Md-Ts`` header) raise :class:`~store_svc.errors.RejectedInput`; record-level problems
come back in :attr:`Decoded.rejects` next to the rows that were fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pydantic

from store_svc.bus.headers import content_format, header
from store_svc.constants import (
    CONTENT_TYPE_HEADER,
    TS_HEADER,
)
from store_svc.errors import RejectedInput
from store_svc.ingest.records import EARLIEST, MIRRORS, Mirror, RowContext, check_kept, to_utc
from store_svc.kinds import KINDS, KindSpec, Row

__all__ = ["Decoded", "PayloadDecoder", "Reject"]


@dataclass(slots=True)
class Reject:
    """One record (or a whole payload) that cannot be stored.

    Attributes:
        reason: stable reason code.
        detail: human-readable explanation.
        raw: the original bytes of the record (or of the whole payload).
        index: the record's position in an array payload; None for a single record
            or a message-level reject.
    """

    reason: str
    detail: str
    raw: bytes
    index: int | None = None


@dataclass(slots=True)
class Decoded:
    """The outcome of decoding one message.

    Attributes:
        spec: the record kind.
        rows: validated rows, in payload order.
        rejects: records that failed, with their reasons.
    """

    spec: KindSpec
    rows: list[Row]
    rejects: list[Reject]


class _Codec:
    """The msgspec decoders of one kind and one encoding, built once."""

    def __init__(self, spec: KindSpec, msgpack: bool) -> None:
        mod: Any = msgspec.msgpack if msgpack else msgspec.json
        self.spec = spec
        self.mirror: Mirror = MIRRORS[spec.kind]
        struct = self.mirror.struct
        self.whole = mod.Decoder(list[struct] | struct)  # type: ignore[valid-type]
        self.one = mod.Decoder(struct)
        self.split = mod.Decoder(list[msgspec.Raw])
        self.untyped = mod.Decoder()
        self.msgpack = msgpack


_PYDANTIC_REASONS = {
    "missing": "missing_field",
    "finite_number": "non_finite_number",
    "literal_error": "invalid_value",
    "enum": "invalid_value",
    "model_type": "not_an_object",
    "model_attributes_type": "not_an_object",
    "dict_type": "not_an_object",
}


def _reason_from_pydantic(exc: pydantic.ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False, include_input=False)[0]
    kind = err["type"]
    where = ".".join(str(p) for p in err["loc"]) or "record"
    if kind in _PYDANTIC_REASONS:
        reason = _PYDANTIC_REASONS[kind]
    elif kind.startswith(("datetime", "date", "time")):
        reason = "invalid_timestamp"
    elif kind.endswith("_type"):
        reason = "wrong_type"
    elif kind.startswith(("decimal", "int", "float")):
        reason = "invalid_number"
    else:
        reason = "invalid_value"
    return reason, f"{where}: {err['msg']}"


class PayloadDecoder:
    """Turns write messages into rows. Build one per service; it holds no state.

    Args:
        max_payload_bytes: larger payloads are rejected as ``oversize_payload``.
        max_future_skew_s: how far in the future a record time may lie.
        retentions: how long each kind keeps its records; older ones are rejected as
            ``beyond_retention`` (a retention pass would only remove them again).
    """

    def __init__(
        self,
        max_payload_bytes: int,
        max_future_skew_s: float,
        retentions: dict[str, timedelta] | None = None,
    ) -> None:
        self._max_payload = max_payload_bytes
        self._skew = timedelta(seconds=max_future_skew_s)
        self._kept = dict(retentions or {})
        self._json = {kind: _Codec(spec, msgpack=False) for kind, spec in KINDS.items()}
        self._msgpack = {kind: _Codec(spec, msgpack=True) for kind, spec in KINDS.items()}

    def decode(
        self,
        kind: str,
        symbol: str | None,
        payload: bytes,
        headers: dict[str, str] | None,
        received: datetime,
    ) -> Decoded:
        """Decode and validate one write message.

        Args:
            kind: the kind token of the subject.
            symbol: the symbol token(s) of the subject, if any.
            payload: the message body.
            headers: the message headers, if any.
            received: when the message arrived (aware UTC).

        Returns:
            The rows and record-level rejects.

        Raises:
            RejectedInput: the message as a whole cannot be used.
        """
        spec = KINDS.get(kind)
        if spec is None:
            raise RejectedInput("unknown_kind", f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if not payload or payload.isspace():
            raise RejectedInput("empty_payload", "the message has no body")
        if len(payload) > self._max_payload:
            raise RejectedInput(
                "oversize_payload",
                f"{len(payload)} bytes is over the limit of {self._max_payload} bytes",
            )
        latest = received + self._skew
        option_ts = received
        if headers:
            codec = self._codec(kind, header(headers, CONTENT_TYPE_HEADER))
            if kind == "options" and (md_ts := header(headers, TS_HEADER)) is not None:
                option_ts = _parse_md_ts(md_ts, latest)
        else:
            codec = self._json[kind]
        kept = self._kept.get(kind)
        if kept is None:
            ctx = RowContext(latest, symbol, option_ts)
        else:
            ctx = RowContext(latest, symbol, option_ts, max(EARLIEST, received - kept))
            if kind == "options":
                check_kept(option_ts, "the snapshot time", ctx.earliest)
        out = Decoded(spec, [], [])
        try:
            whole = codec.whole.decode(payload)
        except (msgspec.ValidationError, UnicodeDecodeError):
            # UnicodeDecodeError: MessagePack text that is not UTF-8, in one record or
            # more; record by record, the others are still stored.
            try:
                self._decode_each(spec, codec, payload, ctx, out)
            except RecursionError:
                raise RejectedInput("malformed_payload", "the body is nested too deeply") from None
            return out
        except msgspec.DecodeError as exc:
            raise RejectedInput("malformed_payload", _decode_detail(exc, codec)) from None
        except RecursionError:
            raise RejectedInput("malformed_payload", "the body is nested too deeply") from None
        records = whole if isinstance(whole, list) else [whole]
        if not records:
            raise RejectedInput("empty_payload", "the array holds no records")
        to_row = codec.mirror.to_row
        rows = out.rows
        try:
            for rec in records:
                rows.append(to_row(rec, ctx))
        except RejectedInput:
            # Rare: a record passed the mirror but not the store's own checks. Redo
            # the message record by record, so each reject carries its own bytes.
            out.rows = []
            self._decode_each(spec, codec, payload, ctx, out)
        return out

    def _codec(self, kind: str, ctype: str | None) -> _Codec:
        if content_format(ctype) == "msgpack":
            return self._msgpack[kind]
        return self._json[kind]

    def _decode_each(
        self, spec: KindSpec, codec: _Codec, payload: bytes, ctx: RowContext, out: Decoded
    ) -> None:
        try:
            raws: list[bytes] = [bytes(r) for r in codec.split.decode(payload)]
            indexed = True
        except msgspec.ValidationError:
            raws, indexed = [payload], False
        except msgspec.DecodeError as exc:
            raise RejectedInput("malformed_payload", _decode_detail(exc, codec)) from None
        if not raws:
            raise RejectedInput("empty_payload", "the array holds no records")
        for i, raw in enumerate(raws):
            index = i if indexed else None
            try:
                out.rows.append(codec.mirror.to_row(self._record(spec, codec, raw), ctx))
            except RejectedInput as rej:
                out.rejects.append(Reject(rej.reason, rej.detail, raw, index))

    @staticmethod
    def _record(spec: KindSpec, codec: _Codec, raw: bytes) -> Any:
        try:
            return codec.one.decode(raw)
        except msgspec.ValidationError:
            pass
        except UnicodeDecodeError:
            raise RejectedInput("invalid_text", "a text is not valid UTF-8") from None
        # The strict mirror said no; Core's own model decides, with its lax rules.
        try:
            if codec.msgpack:
                model = spec.core_model.model_validate(codec.untyped.decode(raw))
            else:
                model = spec.core_model.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            raise RejectedInput(*_reason_from_pydantic(exc)) from None
        except msgspec.DecodeError as exc:
            raise RejectedInput("malformed_payload", _decode_detail(exc, codec)) from None
        except UnicodeDecodeError:
            raise RejectedInput("invalid_text", "a text is not valid UTF-8") from None
        values = model.model_dump()
        return codec.mirror.struct(**values)


def _decode_detail(exc: msgspec.DecodeError, codec: _Codec) -> str:
    what = "MessagePack" if codec.msgpack else "JSON"
    return f"the body is not valid {what}: {exc}"


def _parse_md_ts(value: str, latest: datetime) -> datetime:
    text = value.strip()
    try:
        when: datetime | float
        try:
            when = float(text)
        except ValueError:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return to_utc(when, TS_HEADER, latest)
    except RejectedInput as exc:
        raise RejectedInput("bad_header", exc.detail) from None
    except (ValueError, OverflowError):
        raise RejectedInput(
            "bad_header", f"{TS_HEADER} must be RFC 3339 or epoch seconds, got {text[:40]!r}"
        ) from None
