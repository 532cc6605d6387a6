"""The read API: Core records back out over NATS request-reply.

Subjects (queue group ``STORE_QUEUE_GROUP``, so any instance answers):

* ``<prefix>.store.query.<kind>``: a page of records of the named symbols in a time
  range, ordered by time; the reply carries a cursor for the next page;
* ``<prefix>.store.latest.<kind>``: the latest record of each named symbol.

Requests and replies are JSON, or MessagePack when the request says
``Content-Type: application/msgpack`` (the reply then has the same header). Records
are Core's models as Core prints them (Decimals and times as text); options add
the store's ``ts``. docs/protocol.md has the full description.

A page is read on connections (SQLite: processes) of its own, never the writers',
bounded by ``STORE_QUERY_MAX_LIMIT`` records, the NATS maximum payload and
``STORE_QUERY_TIMEOUT_S``. Errors are replies with ``Nats-Service-Error`` /
``Nats-Service-Error-Code`` headers and a body ``{"error": reason, "detail": ...}``:
400 for a request that cannot be answered as asked, 503 when the database cannot
be read, 504 when the deadline passed.

Cursors are opaque to clients: URL-safe base64 of MessagePack ``[1, kind,
fingerprint, sort key]``. The sort key is that of the last record sent, so the next
page starts strictly after it (keyset paging): pages never repeat or skip a record
that was stored before the first page was asked for and not changed since; records
stored meanwhile appear in a later page when they sort after the cursor. The
fingerprint ties a cursor to its query (kind, symbols, resolution, start, end,
order); the limit may change from page to page. ``"order": "desc"`` reverses the
order (newest first) and pages backwards in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from store_svc.bus.client import payload_room
from store_svc.bus.headers import content_format, error_headers, header
from store_svc.constants import (
    CONTENT_TYPE_HEADER,
)
from store_svc.errors import BadQuery, QueryTimeout, RejectedInput, SinkError
from store_svc.ingest.records import (
    LATEST_EXPIRY,
    RowContext,
    check_symbol,
    time_bound,
)
from store_svc.kinds import KINDS
from store_svc.read.cursor import decode_cursor, encode_cursor
from store_svc.settings import Settings
from store_svc.state import Stats
from store_svc.store.codec import rfc3339_micros
from store_svc.store.reads import LatestPlan, PagePlan, Reader
from store_svc.tasks import cancel_and_wait

__all__ = ["MAX_REQUEST_BYTES", "QueryApi"]

log = logging.getLogger(__name__)

#: Larger query requests are refused (400 ``oversize_request``).
MAX_REQUEST_BYTES = 64 * 1024
#: Room left in a reply for everything but the records (map, cursor, headers).
REPLY_OVERHEAD_BYTES = 2048
#: Requests waiting for a free reader, per reader, before new ones get a 503.
BACKLOG_PER_READER = 32

Format = Literal["json", "msgpack"]
_CONTENT_TYPES: dict[Format, str] = {"json": "application/json", "msgpack": "application/msgpack"}

_Time = datetime | int | float


class QueryRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of a ``query`` request."""

    symbol: str | list[str]
    start: _Time | None = None
    end: _Time | None = None
    resolution: str | None = None
    limit: int | None = None
    cursor: str | None = None
    order: Literal["asc", "desc"] = "asc"


class LatestRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of a ``latest`` request."""

    symbol: str | list[str]
    resolution: str | None = None


_DECODERS: dict[tuple[Format, type[Any]], Any] = {
    (fmt, struct): (msgspec.msgpack if fmt == "msgpack" else msgspec.json).Decoder(struct)
    for fmt in ("json", "msgpack")
    for struct in (QueryRequest, LatestRequest)
}
_ENCODERS: dict[Format, Any] = {
    "json": msgspec.json.Encoder(),
    "msgpack": msgspec.msgpack.Encoder(),
}


def _request_format(msg: Msg) -> Format:
    """The encoding a request names with ``Content-Type`` (none: JSON).

    Raises:
        RejectedInput: ``unsupported_content_type``.
    """
    return content_format(header(msg.headers, CONTENT_TYPE_HEADER) if msg.headers else None)


class QueryApi:
    """Answers the query and latest subjects of one instance.

    Args:
        settings: returns the service's settings now (a reload replaces them; the
            subjects and the queue group are read once, at construction).
        reader: the sink's reader.
        stats: counters to update (``queries``, ``query_records``).
        on_answered: called with ``(endpoint, seconds)`` after each successful reply
            (metrics).
    """

    def __init__(
        self,
        settings: Callable[[], Settings],
        reader: Reader,
        stats: Stats,
        on_answered: Callable[[str, float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._stats = stats
        self._on_answered = on_answered
        #: Queries answered store_unavailable since the last one that succeeded.
        self._unavailable = 0
        now = settings()
        self._query_prefix = now.subject("store", "query") + "."
        self._latest_prefix = now.subject("store", "latest") + "."
        self._subs: list[Subscription] = []
        #: The requests being answered (awaited, then cancelled, by :meth:`stop`).
        self._tasks: set[asyncio.Task[None]] = set()
        self._backlog = now.query_concurrency * BACKLOG_PER_READER
        self._nc: NATS | None = None

    async def start(self, nc: NATS) -> None:
        """Subscribe to the query and latest subjects.

        Args:
            nc: a connected client.
        """
        self._nc = nc
        try:
            await self._reader.open()
        except SinkError as exc:  # queries retry on their own; ingest must not wait
            log.warning("the read API starts without its connections: %s", exc)
        group = self._settings().queue_group
        for prefix in (self._query_prefix, self._latest_prefix):
            self._subs.append(await nc.subscribe(prefix + "*", queue=group, cb=self._on_msg))

    async def stop(self, timeout: float) -> None:
        """Stop taking requests, let those under way finish within ``timeout``
        (the rest are cancelled), and close the reader."""
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except NatsError as exc:
                log.debug("query unsubscribe: %s", exc)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout))
            for task in pending:
                await cancel_and_wait(task)
        await self._reader.close()

    async def _on_msg(self, msg: Msg) -> None:
        endpoint = "latest" if msg.subject.startswith(self._latest_prefix) else "query"
        if not msg.reply:
            self._stats.queries[f"{endpoint}:no_reply_subject"] += 1
            return
        if len(self._tasks) >= self._backlog:
            try:
                fmt = _request_format(msg)
            except RejectedInput:
                fmt = "json"
            await self._error(msg, fmt, endpoint, 503, "busy", "too many queries waiting; retry")
            return
        task = asyncio.create_task(self._answer(msg, endpoint), name="query")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, endpoint: str) -> None:
        began = time.perf_counter()
        latest = endpoint == "latest"
        fmt: Format = "json"
        settings = self._settings()
        try:
            try:
                fmt = _request_format(msg)
            except RejectedInput as exc:
                raise BadQuery(exc.reason, exc.detail) from None
            prefix = self._latest_prefix if latest else self._query_prefix
            kind = msg.subject.removeprefix(prefix)
            if latest:
                body = await self._latest(self._latest_plan(kind, msg.data, fmt))
            else:
                body = await self._page(self._page_plan(kind, msg.data, fmt))
        except BadQuery as exc:
            await self._error(msg, fmt, endpoint, 400, exc.reason, exc.detail)
            return
        except QueryTimeout as exc:
            detail = f"{exc} (STORE_QUERY_TIMEOUT_S={settings.query_timeout_s:g}); narrow the query"
            await self._error(msg, fmt, endpoint, 504, "query_timeout", detail)
            return
        except SinkError as exc:
            # The driver's text stays in the log (the first and every 100th of an
            # outage, not one line a query); the requester gets the reason code.
            self._unavailable += 1
            if self._unavailable == 1 or self._unavailable % 100 == 0:
                log.warning(
                    "queries fail: the database cannot be read (%d so far): %s",
                    self._unavailable,
                    exc,
                )
            detail = "the database cannot be read now; retry later"
            await self._error(msg, fmt, endpoint, 503, "store_unavailable", detail)
            return
        except Exception as exc:  # a bug must cost one reply, never the service
            log.exception("query on %s failed", msg.subject[:200])
            detail = f"{type(exc).__name__}; see the service log"
            await self._error(msg, fmt, endpoint, 500, "internal_error", detail)
            return
        nc = self._nc
        assert nc is not None
        headers = {CONTENT_TYPE_HEADER: _CONTENT_TYPES[fmt]}
        if len(body) > payload_room(nc, headers):
            hint = "fewer symbols or a resolution" if latest else "a smaller limit"
            await self._error(
                msg, fmt, endpoint, 413, "reply_too_large",
                f"the reply would be {len(body)} bytes, over the server's maximum payload "
                f"of {nc.max_payload}; ask for {hint}",
            )  # fmt: skip
            return
        try:
            await nc.publish(msg.reply, body, headers=headers)
        except NatsError as exc:
            log.warning("could not send a query reply: %s", exc)
            return
        self._stats.queries[f"{endpoint}:ok"] += 1
        self._unavailable = 0
        if self._on_answered is not None:
            self._on_answered(endpoint, time.perf_counter() - began)

    async def _page(self, plan: PagePlan) -> bytes:
        nc = self._nc
        assert nc is not None
        room = payload_room(nc, {CONTENT_TYPE_HEADER: _CONTENT_TYPES[plan.fmt]})
        budget = max(1, room - REPLY_OVERHEAD_BYTES)
        page = await self._reader.page(plan, budget, self._settings().query_timeout_s)
        cursor = encode_cursor(plan, page.next_key) if page.next_key is not None else None
        self._stats.query_records += len(page.records)
        records = [msgspec.Raw(r) for r in page.records]
        out: bytes = _ENCODERS[plan.fmt].encode({"records": records, "next_cursor": cursor})
        return out

    async def _latest(self, plan: LatestPlan) -> bytes:
        found = await self._reader.latest(plan, self._settings().query_timeout_s)
        self._stats.query_records += len(found)
        records = [msgspec.Raw(r) for r in found]
        out: bytes = _ENCODERS[plan.fmt].encode({"records": records})
        return out

    # ------------------------------------------------------------------ requests

    def _decode(self, struct: type[Any], data: bytes, fmt: Format) -> Any:
        if not data or data.isspace():
            raise BadQuery(
                "malformed_request", 'the request has no body; send at least {"symbol": ...}'
            )
        if len(data) > MAX_REQUEST_BYTES:
            raise BadQuery(
                "oversize_request",
                f"{len(data)} bytes is over the limit of {MAX_REQUEST_BYTES} bytes",
            )
        try:
            return _DECODERS[(fmt, struct)].decode(data)
        except msgspec.ValidationError as exc:
            raise BadQuery("invalid_request", str(exc)) from None
        except msgspec.DecodeError as exc:
            what = "MessagePack" if fmt == "msgpack" else "JSON"
            raise BadQuery("malformed_request", f"not valid {what}: {exc}") from None
        except RecursionError:
            raise BadQuery("malformed_request", "the request is nested too deeply") from None
        except UnicodeDecodeError:
            raise BadQuery("malformed_request", "a text is not valid UTF-8") from None

    def _kind(self, kind: str) -> str:
        if kind not in KINDS:
            raise BadQuery("unknown_kind", f"kind {kind[:64]!r} is not one of {', '.join(KINDS)}")
        return kind

    def _symbols(self, value: str | list[str], ordered: bool) -> tuple[str, ...]:
        symbols = [value] if isinstance(value, str) else value
        if not symbols:
            raise BadQuery("invalid_request", "symbol must name at least one symbol")
        limit = self._settings().query_max_symbols
        if len(symbols) > limit:
            raise BadQuery(
                "too_many_symbols",
                f"{len(symbols)} symbols is over the limit of {limit} (STORE_QUERY_MAX_SYMBOLS)",
            )
        ctx = RowContext(LATEST_EXPIRY, None, LATEST_EXPIRY)
        for symbol in symbols:
            try:
                check_symbol(symbol, ctx)
            except RejectedInput as exc:
                raise BadQuery("invalid_symbol", f"{symbol[:64]!r}: {exc.detail}") from None
        unique = tuple(dict.fromkeys(symbols))
        return unique if ordered else tuple(sorted(unique))

    def _resolution(self, kind: str, resolution: str | None) -> str | None:
        if resolution is not None and kind != "bars":
            raise BadQuery("invalid_request", "resolution applies to bars only")
        if resolution is not None and (not resolution or "\x00" in resolution):
            raise BadQuery("invalid_request", "resolution must be a non-empty text")
        return resolution

    def _page_plan(self, kind: str, data: bytes, fmt: Format) -> PagePlan:
        kind = self._kind(kind)
        req: QueryRequest = self._decode(QueryRequest, data, fmt)
        settings = self._settings()
        start = self._time(req.start, "start")
        end = self._time(req.end, "end")
        if start is not None and end is not None and end <= start:
            raise BadQuery(
                "invalid_range",
                f"end ({rfc3339_micros(end)}) must be after start ({rfc3339_micros(start)}); "
                "start is included, end is not",
            )
        limit = settings.query_default_limit if req.limit is None else req.limit
        if limit < 1:
            raise BadQuery("invalid_limit", f"limit must be at least 1, not {limit}")
        if limit > settings.query_max_limit:
            raise BadQuery(
                "limit_too_large",
                f"limit {limit} is over the maximum page size of {settings.query_max_limit} "
                "(STORE_QUERY_MAX_LIMIT); page with next_cursor instead",
            )
        plan = PagePlan(
            kind=kind,
            symbols=self._symbols(req.symbol, ordered=False),
            resolution=self._resolution(kind, req.resolution),
            start=start,
            end=end,
            after=None,
            limit=limit,
            fmt=fmt,
            descending=req.order == "desc",
        )
        if req.cursor is not None:
            plan = dataclasses.replace(plan, after=decode_cursor(plan, req.cursor))
        return plan

    def _latest_plan(self, kind: str, data: bytes, fmt: Format) -> LatestPlan:
        kind = self._kind(kind)
        req: LatestRequest = self._decode(LatestRequest, data, fmt)
        return LatestPlan(
            kind=kind,
            symbols=self._symbols(req.symbol, ordered=True),
            resolution=self._resolution(kind, req.resolution),
            fmt=fmt,
        )

    @staticmethod
    def _time(value: datetime | int | float | None, field: str) -> int | None:
        if value is None:
            return None
        try:
            return time_bound(value, field)
        except RejectedInput as exc:
            raise BadQuery("invalid_time", exc.detail) from None

    async def _error(
        self, msg: Msg, fmt: Format, endpoint: str, code: int, reason: str, detail: str
    ) -> None:
        self._stats.queries[f"{endpoint}:{reason}"] += 1
        nc = self._nc
        if nc is None or not msg.reply:
            return
        body = _ENCODERS[fmt].encode({"error": reason, "detail": detail})
        headers = {**error_headers(code, reason, detail), CONTENT_TYPE_HEADER: _CONTENT_TYPES[fmt]}
        try:
            await nc.publish(msg.reply, body, headers=headers)
        except NatsError as exc:
            log.warning("could not send a query error reply: %s", exc)
