"""``store-svc query``: read records back over the read API and print them.

Pages through ``<prefix>.store.query.<kind>`` with the reply cursors until
``--limit`` records are printed or the results end (``--latest`` asks
``<prefix>.store.latest.<kind>`` once). Output is an aligned table, or one JSON
object per line (``--format jsonl``) for pipes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from store_svc.bus.client import CommandClient
from store_svc.settings import Settings

__all__ = ["add_query_parser", "print_table", "run_query"]


def _time_arg(text: str) -> str | float:
    """Epoch numbers go as numbers; anything else as RFC 3339 text."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def add_query_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``query`` sub-command to ``sub`` (an argparse sub-parsers object)."""
    query = sub.add_parser(
        "query",
        help="read records back (time-ordered pages, or the latest per symbol) and print "
        "them as a table or JSON lines",
    )
    query.add_argument("kind", choices=["bars", "trades", "quotes", "options"])
    query.add_argument("symbol", nargs="+", help="one or more symbols")
    query.add_argument("--start", type=_time_arg, help="first time, included (RFC 3339 or epoch)")
    query.add_argument("--end", type=_time_arg, help="end time, excluded (RFC 3339 or epoch)")
    query.add_argument("--resolution", help="bars only: just this resolution (e.g. 1m)")
    query.add_argument(
        "--newest-first", action="store_true", help="newest records first (order desc)"
    )
    query.add_argument(
        "--limit", type=int, default=100, help="most records to print (default 100; 0: all)"
    )
    query.add_argument(
        "--page-size", type=int, default=1000, help="records per request (default 1000)"
    )
    query.add_argument(
        "--latest", action="store_true", help="the latest record of each symbol instead"
    )
    query.add_argument(
        "--format", choices=["table", "jsonl"], default="table", help="output (default table)"
    )
    query.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per request")
    return query  # type: ignore[no-any-return]


async def run_query(settings: Settings, nc: CommandClient, args: argparse.Namespace) -> int:
    """Ask, page and print; 0 on success, 1 when the service refused or did not answer."""
    kind = args.kind
    body: dict[str, Any] = {"symbol": args.symbol}
    if args.resolution is not None:
        body["resolution"] = args.resolution
    if args.latest:
        subject = settings.subject("store", "latest", kind)
    else:
        subject = settings.subject("store", "query", kind)
        for name in ("start", "end"):
            if getattr(args, name) is not None:
                body[name] = getattr(args, name)
        if args.newest_first:
            body["order"] = "desc"
    want = args.limit if args.limit > 0 else None
    records: list[dict[str, Any]] = []
    while True:
        if not args.latest:
            size = args.page_size
            body["limit"] = size if want is None else min(size, want - len(records))
        try:
            reply = await nc.request(subject, json.dumps(body).encode(), timeout=args.timeout)
        except Exception as exc:
            print(f"store-svc query: {nc.no_answer(subject, exc)}", file=sys.stderr)
            return 1
        headers = reply.headers or {}
        if "Nats-Service-Error-Code" in headers:
            code = headers["Nats-Service-Error-Code"]
            error = headers.get("Nats-Service-Error", "")
            print(f"store-svc query: {code} {error}", file=sys.stderr)
            return 1
        page = json.loads(reply.data)
        records += page["records"]
        if args.format == "jsonl":  # stream pages as they come
            for record in page["records"]:
                print(json.dumps(record, ensure_ascii=False))
            sys.stdout.flush()
        cursor = page.get("next_cursor")
        if args.latest or cursor is None or (want is not None and len(records) >= want):
            break
        body["cursor"] = cursor
    if args.format == "table":
        print_table(records, sys.stdout)
    print(f"{len(records)} record(s)", file=sys.stderr)
    return 0


def print_table(records: list[dict[str, Any]], out: TextIO) -> None:
    """Print records as an aligned table with one column per field (text as is,
    ``null`` for missing values, lists as JSON)."""
    if not records:
        return
    columns = list(records[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
