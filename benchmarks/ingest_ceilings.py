"""The ceilings of the ingest benchmark, measured in the same run as the service.

* **A, bare subscriber** (:func:`measure_bare_subscriber`): a nats-py subscriber in its
  own process that only counts messages, fed the scenario's payloads by the same
  core publishers (same flow control) as the service. What NATS and one Python
  subscriber can move; depends on records per message and kind, not on the sink.
* **B, raw sink insert** of the same rows into the same schema:

  - SQLite (:func:`measure_raw_executemany`): plain ``sqlite3`` ``executemany`` of the
    sink's upsert (WAL, the service's ``synchronous``), one transaction per
    ``batch_size`` rows, rows decoded and converted outside the timed part (the
    conversion is timed too and reported as "convert+executemany");
  - PostgreSQL (:func:`measure_raw_copy_merge`): plain asyncpg, per ``batch_size``
    rows one transaction of ``copy_records_to_table`` into the staging table and the
    sink's merge, timed on one connection and on two connections taking turns (the
    next batch staged while the one ahead merges, as the sink does); the faster is
    the ceiling.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
import msgspec
import uvloop

from benchmarks.ingest_cpu import process_seconds, tree_seconds
from benchmarks.ingest_infra import (
    FlowControl,
    await_ready,
    collect,
    count_rows,
    reap,
    run_publishers,
    send_line,
    spawn,
    summarize,
)
from benchmarks.ingest_roles import CORE, SubscriberResult, SubscriberSpec
from store_svc.ingest.decode import PayloadDecoder
from store_svc.kinds import KINDS, KindSpec, Row
from store_svc.settings import Settings
from store_svc.store.codec import compile_converter, time_micros
from store_svc.store.postgres import PostgresSink, merge_sql, staging_records
from store_svc.store.sqlite import SqliteSink, column_plan, upsert_sql

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
#: The SQLite writer process's conversion of each kind (compiled once).
_CONVERTERS = {kind: compile_converter(column_plan(spec)) for kind, spec in KINDS.items()}


def to_sqlite_rows(spec: KindSpec, rows: list[Row], ingested_at: int) -> list[Row]:
    """Turn rows into SQLite parameters exactly as the writer process does: sent
    through MessagePack as the service sends them, then converted by the writer's plan.

    Args:
        spec: the record kind.
        rows: validated rows.
        ingested_at: the commit time, in microseconds since the epoch.

    Returns:
        Parameter tuples for ``upsert_sql(spec)``.
    """
    convert = _CONVERTERS[spec.kind]
    return [convert(row, ingested_at) for row in _unpack(_pack(rows))]


def measure_bare_subscriber(
    url: str,
    settings: Settings,
    kind: str,
    payload_file: Path,
    n_msgs: int,
    per_msg: int,
    flow: FlowControl,
    publishers: int,
    nats_pid: int | list[int] | None = None,
) -> dict[str, Any]:
    """Ceiling A: a nats-py subscriber in its own process that only counts messages.

    Requests (the flow control) are answered on receipt. Run while no JetStream stream
    captures the write subjects. The subscriber's CPU seconds (and nats-server's, given
    its ``nats_pid``) are read around the publishing, until its last reply.

    Returns:
        Throughput, messages counted, msgs/s and records/s, and CPU µs per message.
    """
    subject = settings.subject("store", "write", ">")
    sub = spawn("--bare-subscriber", SubscriberSpec(url, subject, settings.queue_group))
    try:
        await_ready(sub)
        cpu0 = process_seconds(sub.pid)
        nats0 = tree_seconds(nats_pid) if nats_pid else 0.0
        results = run_publishers(
            url,
            settings.subject("store", "write", kind),
            payload_file,
            n_msgs,
            CORE,
            flow,
            publishers,
        )
        cpu_s = process_seconds(sub.pid) - cpu0
        nats_s = tree_seconds(nats_pid) - nats0 if nats_pid else None
        send_line(sub, "STOP")
        counted = collect(sub, SubscriberResult, timeout=60.0)
    finally:
        reap([sub])
    tp = summarize(results, per_msg)
    msgs = max(1, counted.messages)
    return {
        **tp.as_dict(),
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_msg": cpu_s / msgs * 1e6,
        "nats_server_cpu_us_per_msg": None if nats_s is None else nats_s / msgs * 1e6,
        "received_msgs": counted.messages,
        "lost_msgs": tp.published_msgs - counted.messages,
        "slow_consumer_errors": counted.slow_consumer_errors,
        "msgs_per_s": counted.messages / tp.duration_s,
        "records_per_s": counted.messages * per_msg / tp.duration_s,
    }


def row_batches(
    decoder: PayloadDecoder, kind: str, payloads: Sequence[bytes], batch_size: int
) -> Iterator[list[Row]]:
    """Validated rows of ``payloads`` in batches of ``batch_size`` (the last may be short).

    Decoding happens as the batches are drawn, outside the timed writes of the ceilings.
    """
    pending: list[Row] = []
    for payload in payloads:
        pending.extend(decoder.decode(kind, None, payload, None, datetime.now(UTC)).rows)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            del pending[:batch_size]
    if pending:
        yield pending


def _open_schema(db_path: Path) -> None:
    """Create the sink's schema by opening and closing a :class:`SqliteSink`."""

    async def go() -> None:
        sink = SqliteSink(db_path)
        await sink.open()
        await sink.close()

    asyncio.run(go())


def measure_raw_executemany(
    kind: str, payloads: list[bytes], db_path: Path, settings: Settings
) -> dict[str, Any]:
    """Ceiling B for SQLite: the same rows through plain ``sqlite3`` ``executemany``.

    Rows are decoded (untimed) one batch at a time, so memory stays small; then, per
    batch of ``batch_size`` rows, the conversion with ``to_sqlite_rows`` and the
    ``BEGIN IMMEDIATE; executemany; COMMIT`` are timed separately.

    Returns:
        Rows, the two timings and the rows/s of executemany alone and with conversion,
        and the CPU µs per row of each (this thread's CPU time).
    """
    _open_schema(db_path)
    spec = KINDS[kind]
    sql = upsert_sql(spec)
    decoder = PayloadDecoder(settings.max_payload_bytes, settings.max_future_skew_s)
    batch_size = settings.batch_size
    t_convert = t_insert = 0.0
    cpu_convert = cpu_insert = 0.0
    rows_total = 0
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        for batch in row_batches(decoder, kind, payloads, batch_size):
            ingested_at = time_micros(datetime.now(UTC))
            t0, c0 = time.perf_counter(), time.thread_time()
            params = to_sqlite_rows(spec, batch, ingested_at)
            t1, c1 = time.perf_counter(), time.thread_time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, params)
            conn.execute("COMMIT")
            t2, c2 = time.perf_counter(), time.thread_time()
            t_convert += t1 - t0
            t_insert += t2 - t1
            cpu_convert += c1 - c0
            cpu_insert += c2 - c1
            rows_total += len(batch)
    stored = count_rows(db_path, kind)
    return {
        "method": "sqlite3 executemany",
        "rows": rows_total,
        "stored": stored,
        "batch_size": batch_size,
        "executemany_s": round(t_insert, 4),
        "convert_s": round(t_convert, 4),
        "rows_per_s": rows_total / t_insert,
        "convert_plus_executemany_rows_per_s": rows_total / (t_insert + t_convert),
        "cpu_us_per_row": cpu_insert / rows_total * 1e6,
        "convert_plus_executemany_cpu_us_per_row": (cpu_insert + cpu_convert) / rows_total * 1e6,
    }


def measure_raw_copy_merge(
    kind: str,
    payloads: list[bytes],
    database_url: str,
    settings: Settings,
    timescaledb: Literal["auto", "require", "off"] = "off",
    pg_pid: int | list[int] | None = None,
) -> dict[str, Any]:
    """Ceiling B for PostgreSQL: the same rows through plain asyncpg COPY + merge.

    The schema is created by opening (and closing) a :class:`PostgresSink` on the
    fresh database ``database_url``; the rows are decoded up front (untimed) into
    batches of ``batch_size``. Each batch is one transaction doing what the sink
    does: ``copy_records_to_table`` of :func:`staging_records` (built in the timed
    part) into the staging table (made once per connection) and the merge of
    :func:`merge_sql`. Two ways are timed, the table emptied between them: one
    connection, one transaction after another; and two connections taking turns,
    the next batch staged while the one ahead merges (as the sink does). The ceiling
    is the faster of the two. Runs on uvloop, as the service does.

    Args:
        kind: the record kind (table).
        payloads: the scenario's message bodies.
        database_url: a fresh, empty PostgreSQL database.
        settings: supplies ``batch_size`` and the decoder limits.
        timescaledb: ``off`` for plain tables, ``require`` for hypertables.
        pg_pid: the postmaster, whose tree's CPU (the backends) is counted per way.

    Returns:
        Rows, rows stored, the seconds and rows/s of each way, and ``rows_per_s`` of
        the faster (the ceiling); CPU µs per row of each way (this client and the
        PostgreSQL server), and ``cpu_us_per_row`` of the faster.
    """
    return uvloop.run(_raw_copy_merge(kind, payloads, database_url, settings, timescaledb, pg_pid))


async def _raw_copy_merge(
    kind: str,
    payloads: list[bytes],
    database_url: str,
    settings: Settings,
    timescaledb: Literal["auto", "require", "off"],
    pg_pid: int | list[int] | None,
) -> dict[str, Any]:
    """The body of :func:`measure_raw_copy_merge` (inside the event loop)."""

    def cpu() -> tuple[float, float]:
        return time.thread_time(), tree_seconds(pg_pid) if pg_pid else 0.0

    sink = PostgresSink(database_url, timescaledb=timescaledb)
    await sink.open()
    timescale = sink.timescale
    await sink.close()
    spec = KINDS[kind]
    create, merge = merge_sql(spec)
    stage = f"stage_{kind}"
    decoder = PayloadDecoder(settings.max_payload_bytes, settings.max_future_skew_s)
    batches = list(row_batches(decoder, kind, payloads, settings.batch_size))
    rows_total = sum(len(b) for b in batches)
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        for conn in conns:
            await conn.execute(create)

        async def stage_rows(conn: asyncpg.Connection, batch: list[Row]) -> Any:
            tx = conn.transaction()
            await tx.start()
            await conn.copy_records_to_table(stage, records=staging_records(kind, batch))
            return tx

        async def merge_commit(conn: asyncpg.Connection, tx: Any) -> None:
            await conn.execute(merge)
            await tx.commit()

        # One connection, one transaction after another.
        t0, cpu0 = time.perf_counter(), cpu()
        for batch in batches:
            await merge_commit(conns[0], await stage_rows(conns[0], batch))
        sequential_s = time.perf_counter() - t0
        cpu_sequential = [b - a for a, b in zip(cpu0, cpu(), strict=True)]
        stored_sequential = int(await conns[0].fetchval(f"SELECT count(*) FROM {kind}"))
        await conns[0].execute(f"TRUNCATE {kind}")

        # Two connections taking turns, as the sink does: the next batch is staged
        # while the one ahead merges and commits; commits stay in order.
        t0, cpu0 = time.perf_counter(), cpu()
        ahead: asyncio.Task[None] | None = None
        for n, batch in enumerate(batches):
            conn = conns[n % 2]
            tx = await stage_rows(conn, batch)
            if ahead is not None:
                await ahead
            ahead = asyncio.create_task(merge_commit(conn, tx))
        if ahead is not None:
            await ahead
        overlapped_s = time.perf_counter() - t0
        cpu_overlapped = [b - a for a, b in zip(cpu0, cpu(), strict=True)]
        stored = int(await conns[0].fetchval(f"SELECT count(*) FROM {kind}"))
    finally:
        for conn in conns:
            await conn.close()
    return {
        "method": "asyncpg COPY + merge",
        "rows": rows_total,
        "stored": stored,
        "stored_sequential": stored_sequential,
        "batch_size": settings.batch_size,
        "timescaledb": timescale,
        "sequential_s": round(sequential_s, 4),
        "overlapped_s": round(overlapped_s, 4),
        "sequential_rows_per_s": rows_total / sequential_s,
        "overlapped_rows_per_s": rows_total / overlapped_s,
        "rows_per_s": rows_total / min(sequential_s, overlapped_s),
        "sequential_cpu_us_per_row": _per_row(cpu_sequential, rows_total),
        "overlapped_cpu_us_per_row": _per_row(cpu_overlapped, rows_total),
        "cpu_us_per_row": sum(cpu_sequential if sequential_s <= overlapped_s else cpu_overlapped)
        / rows_total
        * 1e6,
    }


def _per_row(cpu: list[float], rows: int) -> dict[str, float]:
    """CPU µs per row of the client and of the PostgreSQL server."""
    client, server = cpu
    return {"client": client / rows * 1e6, "postgresql": server / rows * 1e6}
