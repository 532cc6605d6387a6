"""Ingest benchmark of ``store-svc``: throughput against two ceilings, and latency.

Everything runs in one invocation, on one private ``nats-server`` with JetStream
enabled (its store in a temporary directory removed at the end; and, when a
PostgreSQL scenario is selected, one private PostgreSQL server started with
:class:`~store_svc.pgserver.PostgresServer` and removed at the end), so the ratios
compare like with like on the same (possibly busy) machine. Five scenarios, all of
Core trades:

* ``single``: one record per message, into a SQLite file in a fresh temporary directory;
* ``single-js``: the same in JetStream mode (see below);
* ``batch500``: 500 records per message, into a SQLite file likewise;
* ``batch500-js``: the same in JetStream mode;
* ``batch500-pg``: 500 records per message, into a fresh PostgreSQL database.

The core scenarios (the three without ``-js``) use plain NATS: no stream captures the
write subjects while they run (the stream is deleted before every scenario and after
every JetStream one), so JetStream being enabled on the server does not touch them.

For each scenario, with the same pre-generated payloads (every record has its own
``ts``, so no two records collide on the idempotency key):

1. **Ceiling A, bare subscriber**: a nats-py subscriber in its own process that only
   counts messages, fed by the same publisher setup as the service.
2. **Ceiling B, raw executemany**: the same rows, decoded with
   :class:`~store_svc.decode.PayloadDecoder` and converted with
   :func:`~store_svc.sinks.sqlite.to_sqlite_rows` outside the timed section, inserted
   with plain ``sqlite3`` ``executemany(upsert_sql(spec))`` into the sink's schema
   (WAL, ``synchronous=NORMAL``), one commit per ``batch_size`` rows. The time of the
   conversion is measured too and reported as "convert+executemany".

   For ``batch500-pg`` ceiling B is **raw asyncpg COPY + merge** instead: the same
   rows, decoded outside the timed section, written with one plain asyncpg
   connection into the sink's schema (created in a fresh database by opening and
   closing a :class:`~store_svc.sinks.postgres.PostgresSink`), one transaction per
   ``batch_size`` rows holding exactly what the sink's write does:
   ``copy_records_to_table`` of
   :func:`~store_svc.sinks.postgres.staging_records` (built in the timed part) and
   the merge of :func:`~store_svc.sinks.postgres.merge_sql`; timed once on one
   connection and once on two connections taking turns (the next batch staged
   while the one ahead merges, as the sink does); the faster is the ceiling.
3. **The service**: the real ``store-svc run`` console script as a subprocess with
   default settings except ``STORE_NATS_URL`` and ``STORE_DATABASE_URL``. Throughput
   is stored rows over the time from the first publish to the reply of the last
   message (a write with a reply subject is answered after its rows are committed,
   and the batcher commits in FIFO order, so that reply means everything is in).
   The row count of the database (SQLite file, or PostgreSQL through asyncpg) is
   then checked against what was published. A PostgreSQL service gets its own fresh
   database, apart from ceiling B's.
4. **Latency**: a paced load at half the service's measured maximum, each message a
   request; latency is reply arrival minus send time, an upper bound of
   publish-to-commit.

**JetStream scenarios** (``single-js``, ``batch500-js``): the service runs with
``STORE_INGEST_MODE=jetstream``, so it creates the stream ``STORE_WRITES`` over the
write subjects (workqueue retention, file storage) and the durable pull consumer
``store``, and acks each message after its records are committed. The stream is
deleted just before the scenario's service starts (a fresh stream, so no scenario sees
another's messages) and again after it stops. Differences from the core scenarios:

* **Ceilings**: the same as the core twin's (``single`` for ``single-js``,
  ``batch500`` for ``batch500-js``): reused from the twin when it ran earlier in the
  same invocation, otherwise measured in the scenario exactly as for the twin (core
  publishers, before the stream exists). The ratios are service ÷ those ceilings,
  plus service ÷ the core twin's service where the twin ran.
* **Publishing**: JetStream publishes (nats-py ``publish_async``), at most
  ``window`` PubAcks outstanding per publisher, so the publisher is flow-controlled
  by the stream. A request to a stream subject is answered by the stream's PubAck,
  not by the store, so PubAcks say nothing about commits.
* **Throughput** is stored rows over the time from the first publish to the moment
  the last record is visible as committed in the SQLite file: the benchmark polls
  ``max(rowid)`` of the trades table every 5 ms from a reader connection (on the
  fresh table it equals the row count; rows become visible at commit, WAL mode), and
  confirms with ``count(*)`` at the end. "stream ingest rows/s" is the publishers'
  rate up to the last PubAck (how fast the stream took the messages).
* **Latency**: the paced load is JetStream publishes; the paced process also
  subscribes to the consumer's ack subjects (``$JS.ACK.STORE_WRITES.store.>``; a
  plain subscriber gets a copy of every ack the service sends) and matches each ack
  to its message by the stream sequence the PubAck returned. Latency is ack arrival
  minus send time, the same upper bound of publish-to-commit as the core reply
  (the service acks after commit), measured for every message rather than a sample
  (the ack copies cost the server and the paced process, not the service).
  There is no p99 target for JetStream scenarios; their latency is for information.
* JetStream scenarios use the SQLite sink only.

Flow control (core scenarios): core NATS has no back-pressure, so a publisher sending
flat out can overrun a subscriber (slow-consumer drops). Each publisher therefore sends
every ``chunk``-th message as a request and keeps at most ``window`` such requests
unanswered; the same scheme feeds the bare subscriber (which answers requests on
receipt) and the service (which answers after commit). The window is far larger
than a batch, so it never starves either consumer; it only bounds what is buffered.

Publishers, the bare subscriber and the paced latency publisher are this same
script in internal roles (``--publisher``, ``--paced``, ``--bare-subscriber``, each
taking a JSON spec), started as subprocesses and released together on stdin.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py --quick   # CI smoke run, about a minute
    .venv/bin/python benchmarks/bench_ingest.py           # full run, a few minutes
    .venv/bin/python benchmarks/bench_ingest.py --only batch500-pg   # one scenario
    .venv/bin/python benchmarks/bench_ingest.py --only single --only single-js

Results: a table on stdout and JSON in ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import asyncpg
import msgspec
import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as JsNotFoundError

from store_svc.decode import PayloadDecoder
from store_svc.demo import synthetic_records
from store_svc.natsserver import NatsServer, find_nats_server
from store_svc.pgserver import PostgresServer, find_pg_bin
from store_svc.records import KINDS, Row
from store_svc.settings import Settings
from store_svc.sinks.postgres import PostgresSink, merge_sql, staging_records
from store_svc.sinks.sqlite import SqliteSink, to_sqlite_rows, upsert_sql
from store_svc.sinks.sqlite_worker import time_micros

KIND = "trades"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "ingest.json"

#: Targets: service ÷ bare subscriber (single-record), service ÷ raw executemany
#: (500-record, SQLite), service ÷ raw COPY + merge (500-record, PostgreSQL), and p99
#: publish→commit latency at half the maximum rate.
TARGET_SINGLE_VS_BARE = 0.75
TARGET_BATCH_VS_RAW = 0.8
TARGET_BATCH_PG_VS_RAW = 0.8

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
TARGET_P99_MS = 25.0

#: Ingest modes of the service (``STORE_INGEST_MODE``).
CORE: Final = "core"
JETSTREAM: Final = "jetstream"
#: The ``-js`` scenarios' suffix; the name without it is the core twin.
JS_SUFFIX = "-js"

_STOPPED_LINE = re.compile(
    r"store-svc stopped: (\d+) records committed, (\d+) rejected, (\d+) messages dropped"
    r"(?: \((\d+) received\))?"
)
_JS_STOPPED_LINE = re.compile(
    r"JetStream: (\d+) messages acked, (\d+) redelivered to this instance, "
    r"(\d+) terminated, (\d+) handed back"
)


# --------------------------------------------------------------------------- config

#: JetStream scenarios: outstanding PubAcks per publisher (one-record messages, and
#: 500-record messages of about 60 kB). They bound what a publisher has in flight to
#: the server, not what the stream holds for the service.
JS_WINDOW_SINGLE = 1_000
JS_WINDOW_BATCH = 20


@dataclass(frozen=True)
class Scenario:
    """One workload shape.

    Attributes:
        name: short name used in the table and the JSON.
        per_msg: records per message.
        messages: messages published in each throughput run.
        chunk: core mode: every ``chunk``-th message is a request (flow control);
            unused in JetStream mode (every message gets a PubAck).
        window: core mode: unanswered requests a publisher allows before it waits;
            JetStream mode: outstanding PubAcks a publisher allows.
        latency_seconds: how long the paced latency load runs.
        sink: where the service stores: ``"sqlite"`` (a file) or ``"postgresql"``
            (a fresh database on the run's PostgreSQL server).
        mode: the service's ingest mode: ``"core"`` or ``"jetstream"``.
    """

    name: str
    per_msg: int
    messages: int
    chunk: int
    window: int
    latency_seconds: float
    sink: str = SQLITE
    mode: str = CORE

    @property
    def records(self) -> int:
        """Records published in each throughput run."""
        return self.messages * self.per_msg

    @property
    def core_twin(self) -> str | None:
        """The core scenario whose ceilings a JetStream scenario shares (None for core)."""
        return self.name.removesuffix(JS_SUFFIX) if self.mode == JETSTREAM else None


# A JetStream scenario runs after its core twin, so it can reuse the twin's ceilings.
QUICK = (
    Scenario("single", 1, 20_000, chunk=2_000, window=10, latency_seconds=2.0),
    Scenario(
        "single-js",
        1,
        20_000,
        chunk=2_000,
        window=JS_WINDOW_SINGLE,
        latency_seconds=2.0,
        mode=JETSTREAM,
    ),
    Scenario("batch500", 500, 200, chunk=4, window=25, latency_seconds=2.0),
    Scenario(
        "batch500-js",
        500,
        200,
        chunk=4,
        window=JS_WINDOW_BATCH,
        latency_seconds=2.0,
        mode=JETSTREAM,
    ),
    Scenario("batch500-pg", 500, 200, chunk=4, window=25, latency_seconds=2.0, sink=POSTGRESQL),
)
FULL = (
    Scenario("single", 1, 400_000, chunk=5_000, window=10, latency_seconds=5.0),
    Scenario(
        "single-js",
        1,
        400_000,
        chunk=5_000,
        window=JS_WINDOW_SINGLE,
        latency_seconds=5.0,
        mode=JETSTREAM,
    ),
    Scenario("batch500", 500, 4_000, chunk=10, window=10, latency_seconds=5.0),
    Scenario(
        "batch500-js",
        500,
        4_000,
        chunk=10,
        window=JS_WINDOW_BATCH,
        latency_seconds=5.0,
        mode=JETSTREAM,
    ),
    Scenario("batch500-pg", 500, 4_000, chunk=10, window=10, latency_seconds=5.0, sink=POSTGRESQL),
)


@dataclass(frozen=True)
class RunOptions:
    """Options that apply to every scenario.

    Attributes:
        publishers: throughput publisher processes per run.
        latency_fraction: the latency load as a fraction of the measured maximum.
        profile_dir: where py-spy profiles of the service go; None for no profiling.
    """

    publishers: int = 1
    latency_fraction: float = 0.5
    profile_dir: Path | None = None


# ------------------------------------------------------------------ role specs (IPC)


class PublisherSpec(msgspec.Struct, frozen=True):
    """What a throughput publisher process sends (``--publisher``)."""

    url: str
    subject: str
    payloads: str
    start: int
    stop: int
    chunk: int
    window: int
    timeout: float
    mode: str = CORE


class PacedSpec(msgspec.Struct, frozen=True):
    """What the paced latency publisher sends (``--paced``).

    In JetStream mode every message is a JetStream publish (``sample_every`` is
    unused), at most ``window`` PubAcks outstanding, and ``ack_subject`` is where the
    service's acks are watched.
    """

    url: str
    subject: str
    payloads: str
    rate: float
    timeout: float
    sample_every: int = 1
    mode: str = CORE
    ack_subject: str = ""
    window: int = 1_000


class SubscriberSpec(msgspec.Struct, frozen=True):
    """Where the bare subscriber listens (``--bare-subscriber``)."""

    url: str
    subject: str
    queue: str


class PublishResult(msgspec.Struct):
    """What a throughput publisher reports (times are ``time.monotonic``, which is
    system-wide on Linux and so comparable across processes)."""

    messages: int
    requests: int
    replies: int
    accepted: int
    rejected: int
    error_replies: int
    first_publish: float
    last_publish: float
    last_reply: float
    timed_out: bool


class PacedResult(msgspec.Struct):
    """What the paced latency publisher reports."""

    messages: int
    replies: int
    error_replies: int
    achieved_rate: float
    latencies_ms: list[float]
    timed_out: bool


class SubscriberResult(msgspec.Struct):
    """What the bare subscriber reports."""

    messages: int
    slow_consumer_errors: int


_READY = "READY"
_GO = "GO"
_T = TypeVar("_T")


# ------------------------------------------------------------------------ payloads


class TsAllocator:
    """Hands out disjoint microsecond ranges, so every record in the run is unique.

    Starts two days in the past: well inside the service's accepted time window.
    """

    def __init__(self) -> None:
        self._next_us = time.time_ns() // 1000 - 2 * 86_400 * 1_000_000

    def take(self, n: int) -> int:
        """Reserve ``n`` consecutive microseconds.

        Args:
            n: how many records will use the range.

        Returns:
            The first epoch microsecond of the range.
        """
        first = self._next_us
        self._next_us += n
        return first


def make_payloads(per_msg: int, n_msgs: int, first_us: int, seed: int) -> list[bytes]:
    """Build JSON trade messages with :func:`store_svc.demo.synthetic_records`.

    Args:
        per_msg: records per message (one record is sent as a bare object).
        n_msgs: how many messages.
        first_us: epoch microsecond of the first record; each next record is 1 µs later.
        seed: random seed.

    Returns:
        The encoded message bodies.
    """
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    out: list[bytes] = []
    for i in range(n_msgs):
        recs = synthetic_records(KIND, per_msg, rng, (first_us + i * per_msg) * 1000)
        out.append(encode(recs[0] if per_msg == 1 else recs))
    return out


def save_payloads(path: Path, payloads: list[bytes]) -> None:
    """Write payloads for the publisher processes (MessagePack list of binaries)."""
    path.write_bytes(msgspec.msgpack.encode(payloads))


def load_payloads(path: str) -> list[bytes]:
    """Read payloads written by :func:`save_payloads`."""
    return msgspec.msgpack.decode(Path(path).read_bytes(), type=list[bytes])


# ---------------------------------------------------------- child roles (processes)


async def _wait_for_go() -> None:
    """Tell the orchestrator we are ready, then wait for its go line on stdin."""
    print(_READY, flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != _GO:
        raise SystemExit(f"expected {_GO!r} on stdin, got {line!r}")


def _is_error_reply(msg: Msg) -> bool:
    """True for a service error reply (ADR-32 headers) or a no-responders status."""
    headers = msg.headers or {}
    return "Nats-Service-Error-Code" in headers or "Status" in headers


async def publisher_role(spec: PublisherSpec) -> PublishResult:
    """Publish a slice of the payloads flat out, with windowed request flow control.

    Every ``chunk``-th message and the last one carry a reply subject; at most
    ``window`` of them may be unanswered. The last reply marks the end: NATS keeps
    the order of one publisher's messages and the service commits in FIFO order.
    In JetStream mode, see :func:`_publish_jetstream`.

    Args:
        spec: what and where to publish.

    Returns:
        Counts and times.
    """
    payloads = load_payloads(spec.payloads)[spec.start : spec.stop]
    if spec.mode == JETSTREAM:
        return await _publish_jetstream(spec, payloads)
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url, name="bench-publisher")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    is_request = [(i + 1) % spec.chunk == 0 or i == n - 1 for i in range(n)]
    expected = sum(is_request)
    slots = asyncio.Semaphore(spec.window)
    done: asyncio.Future[None] = loop.create_future()
    result = PublishResult(n, expected, 0, 0, 0, 0, 0.0, 0.0, 0.0, False)

    async def on_reply(msg: Msg) -> None:
        result.last_reply = time.monotonic()
        result.replies += 1
        if _is_error_reply(msg):
            result.error_replies += 1
        elif msg.data:
            body = json.loads(msg.data)
            result.accepted += body["accepted"]
            result.rejected += body["rejected"]
        slots.release()
        if result.replies >= expected and not done.done():
            done.set_result(None)

    await nc.subscribe(inbox + ".*", cb=on_reply)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject
    publish = nc.publish
    result.first_publish = time.monotonic()
    for i, payload in enumerate(payloads):
        if is_request[i]:
            await slots.acquire()
            await publish(subject, payload, reply=f"{inbox}.{i}")
        else:
            await publish(subject, payload)
    result.last_publish = time.monotonic()
    await nc.flush()
    try:
        await asyncio.wait_for(done, spec.timeout)
    except TimeoutError:
        result.timed_out = True
    await nc.close()
    return result


async def _publish_jetstream(spec: PublisherSpec, payloads: list[bytes]) -> PublishResult:
    """Publish flat out with JetStream publishes, at most ``window`` PubAcks outstanding.

    Every message gets a PubAck from the stream once stored; the PubAcks are the flow
    control and say nothing about the service. The result's ``requests`` and
    ``replies`` count PubAcks owed and received, ``last_reply`` is the last PubAck;
    the orchestrator watches the database for the end of the run.

    Args:
        spec: what and where to publish.
        payloads: this publisher's slice.

    Returns:
        Counts and times.
    """
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url, name="bench-publisher-js")
    js = nc.jetstream(publish_async_max_pending=spec.window)
    result = PublishResult(n, n, 0, 0, 0, 0, 0.0, 0.0, 0.0, False)

    def on_puback(fut: asyncio.Future[Any]) -> None:
        result.last_reply = time.monotonic()
        result.replies += 1
        if fut.cancelled() or fut.exception() is not None:
            result.error_replies += 1

    await _wait_for_go()
    subject = spec.subject
    publish = js.publish_async
    result.first_publish = time.monotonic()
    for payload in payloads:
        fut = await publish(subject, payload)
        fut.add_done_callback(on_puback)
    result.last_publish = time.monotonic()
    try:
        await asyncio.wait_for(js.publish_async_completed(), spec.timeout)
    except TimeoutError:
        result.timed_out = True
    await nc.close()
    return result


def _ack_stream_seq(subject: str) -> int:
    """The stream sequence in a JetStream ack subject (v1 ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<sseq>...``, 9 tokens, or v2 with domain and account hash first)."""
    tokens = subject.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


async def _paced_jetstream(spec: PacedSpec, payloads: list[bytes]) -> PacedResult:
    """The paced load in JetStream mode: latency is the service's ack of each message.

    Every message is a JetStream publish; its PubAck gives its stream sequence. A
    subscriber on ``spec.ack_subject`` gets a copy of every ack the service sends
    (after the commit), and its sequence ties it to the message. Latency is ack
    arrival minus send time (taken just before the publish), for every message.

    Args:
        spec: what, where and how fast.
        payloads: the messages.

    Returns:
        Per-message latencies in ms (acked messages only) and counts.
    """
    n = len(payloads)
    nc: NATS = await nats.connect(spec.url, name="bench-paced-js")
    js = nc.jetstream(publish_async_max_pending=spec.window)
    loop = asyncio.get_running_loop()
    sent = [0.0] * n
    seq_of = [0] * n
    acked_at: dict[int, float] = {}
    counts = {"pubacks": 0, "errors": 0}
    wanted: set[int] = set()
    waiting = False
    done: asyncio.Future[None] = loop.create_future()

    async def on_ack(msg: Msg) -> None:
        now = time.monotonic()
        if msg.data:  # +WPI, -NAK, +TERM: not an ack
            return
        seq = _ack_stream_seq(msg.subject)
        acked_at.setdefault(seq, now)
        if waiting:
            wanted.discard(seq)
            if not wanted and not done.done():
                done.set_result(None)

    def on_puback(i: int, fut: asyncio.Future[Any]) -> None:
        counts["pubacks"] += 1
        if fut.cancelled() or fut.exception() is not None:
            counts["errors"] += 1
        else:
            seq_of[i] = fut.result().seq

    await nc.subscribe(spec.ack_subject, cb=on_ack)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject
    rate = spec.rate
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        while i < due:
            sent[i] = time.monotonic()
            fut = await js.publish_async(subject, payloads[i])
            fut.add_done_callback(functools.partial(on_puback, i))
            i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    t_end = time.monotonic()
    timed_out = False
    deadline = t_end + spec.timeout
    try:
        await asyncio.wait_for(js.publish_async_completed(), spec.timeout)
        wanted.update(s for s in seq_of if s and s not in acked_at)
        waiting = True
        if wanted:
            await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        timed_out = True
    await nc.close()
    latencies = [
        (acked_at[q] - s) * 1000 for s, q in zip(sent, seq_of, strict=True) if q in acked_at
    ]
    replies = sum(1 for q in seq_of if q in acked_at)
    achieved = n / (t_end - t0) if t_end > t0 else math.nan
    return PacedResult(n, replies, counts["errors"], achieved, latencies, timed_out)


async def paced_role(spec: PacedSpec) -> PacedResult:
    """Send the payloads at a fixed rate; every ``sample_every``-th one as a request.

    The sampled messages carry a reply subject and are answered after commit; the
    others are plain publishes, as a feed's would be, and share batches with the
    sampled ones. Sampling keeps the reply traffic (which costs the service about as
    much as a message) from changing the load being measured. The send time is
    taken just before ``publish``, so reply arrival minus send time is an upper
    bound of publish→commit.

    Args:
        spec: what, where and how fast.

    Returns:
        Per-message latencies in ms (replied messages only) and counts.
    """
    payloads = load_payloads(spec.payloads)
    if spec.mode == JETSTREAM:
        return await _paced_jetstream(spec, payloads)
    n = len(payloads)
    every = max(1, spec.sample_every)
    # The last message is always sampled: its reply means every message is committed.
    sampled = [i % every == 0 or i == n - 1 for i in range(n)]
    expected = sum(sampled)
    nc: NATS = await nats.connect(spec.url, name="bench-paced")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sent = [0.0] * n
    got = [math.nan] * n
    done: asyncio.Future[None] = loop.create_future()
    counts = {"replies": 0, "errors": 0}

    async def on_reply(msg: Msg) -> None:
        now = time.monotonic()
        got[int(msg.subject.rpartition(".")[2])] = now
        counts["replies"] += 1
        if _is_error_reply(msg):
            counts["errors"] += 1
        if counts["replies"] >= expected and not done.done():
            done.set_result(None)

    await nc.subscribe(inbox + ".*", cb=on_reply)
    await nc.flush()
    await _wait_for_go()
    subject = spec.subject
    rate = spec.rate
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        while i < due:
            if sampled[i]:
                sent[i] = time.monotonic()
                await nc.publish(subject, payloads[i], reply=f"{inbox}.{i}")
            else:
                await nc.publish(subject, payloads[i])
            i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    t_end = time.monotonic()
    timed_out = False
    try:
        await asyncio.wait_for(done, spec.timeout)
    except TimeoutError:
        timed_out = True
    await nc.close()
    latencies = [(g - s) * 1000 for s, g in zip(sent, got, strict=True) if not math.isnan(g)]
    achieved = n / (t_end - t0) if t_end > t0 else math.nan
    # ``messages`` counts the sampled requests, the ones a reply is owed for.
    return PacedResult(
        expected, counts["replies"], counts["errors"], achieved, latencies, timed_out
    )


async def bare_subscriber_role(spec: SubscriberSpec) -> SubscriberResult:
    """Count messages on the write subject and nothing else (ceiling A).

    Requests (the flow-control messages) are answered on receipt. Stops when the
    orchestrator writes a line on stdin (or closes it).

    Args:
        spec: where to listen.

    Returns:
        Messages counted and slow-consumer errors seen.
    """
    result = SubscriberResult(0, 0)

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            result.slow_consumer_errors += 1

    nc: NATS = await nats.connect(spec.url, name="bench-bare-subscriber", error_cb=on_error)

    async def count(msg: Msg) -> None:
        result.messages += 1
        if msg.reply:
            await nc.publish(msg.reply, b"")

    await nc.subscribe(spec.subject, queue=spec.queue, cb=count)
    await nc.flush()
    print(_READY, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await nc.drain()
    return result


# --------------------------------------------------------------- child management


def _spawn(role: str, spec: msgspec.Struct) -> subprocess.Popen[str]:
    """Start this script in an internal role; its stdout carries READY and the result."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), role, msgspec.json.encode(spec).decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _role(proc: subprocess.Popen[str]) -> str:
    """The internal role a child runs (for error messages)."""
    args = proc.args
    return str(args[2]) if isinstance(args, list) and len(args) > 2 else str(args)


def _await_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != _READY:
        proc.kill()
        raise RuntimeError(f"child {_role(proc)} did not get ready (said {line!r})")


def _send_line(proc: subprocess.Popen[str], line: str) -> None:
    stdin: IO[str] | None = proc.stdin
    assert stdin is not None
    stdin.write(line + "\n")
    stdin.flush()


def _collect(proc: subprocess.Popen[str], kind: type[_T], timeout: float) -> _T:
    """Read a child's JSON result line and reap it."""
    assert proc.stdout is not None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"child {_role(proc)} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"child {_role(proc)} failed with exit code {proc.returncode}")
    return msgspec.json.decode(out.strip().splitlines()[-1], type=kind)


def run_publishers(
    url: str, subject: str, payload_file: Path, n_msgs: int, scenario: Scenario, publishers: int
) -> list[PublishResult]:
    """Start ``publishers`` throughput publishers on contiguous slices, release them
    together and collect their results. A JetStream scenario's publishers use
    JetStream publishes (see :func:`_publish_jetstream`).
    """
    bounds = [n_msgs * k // publishers for k in range(publishers + 1)]
    procs = [
        _spawn(
            "--publisher",
            PublisherSpec(
                url,
                subject,
                str(payload_file),
                bounds[k],
                bounds[k + 1],
                scenario.chunk,
                scenario.window,
                timeout=300.0,
                mode=scenario.mode,
            ),
        )
        for k in range(publishers)
    ]
    try:
        for p in procs:
            _await_ready(p)
        for p in procs:
            _send_line(p, _GO)
        return [_collect(p, PublishResult, timeout=600.0) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@dataclass
class Throughput:
    """Throughput of one run, from the publishers' point of view."""

    published_msgs: int
    published_records: int
    duration_s: float
    publish_s: float
    replies: int
    requests: int
    error_replies: int
    timed_out: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the JSON report."""
        return {
            "published_msgs": self.published_msgs,
            "published_records": self.published_records,
            "duration_s": round(self.duration_s, 4),
            "publish_msgs_per_s": self.published_msgs / self.publish_s,
            "flow_control_requests": self.requests,
            "flow_control_replies": self.replies,
            "error_replies": self.error_replies,
            "timed_out": self.timed_out,
        }


def summarize(results: list[PublishResult], per_msg: int) -> Throughput:
    """Combine publisher results: first publish of any to last reply of all."""
    start = min(r.first_publish for r in results)
    end = max(r.last_reply if r.replies else r.last_publish for r in results)
    msgs = sum(r.messages for r in results)
    return Throughput(
        published_msgs=msgs,
        published_records=msgs * per_msg,
        duration_s=end - start,
        publish_s=max(r.last_publish for r in results) - start,
        replies=sum(r.replies for r in results),
        requests=sum(r.requests for r in results),
        error_replies=sum(r.error_replies for r in results),
        timed_out=any(r.timed_out for r in results),
    )


# ----------------------------------------------------------------- the service


class ServiceProcess:
    """``store-svc run`` as a subprocess, with its log in a file.

    Args:
        settings: the settings it runs with (only the two URLs, and the ingest mode when
            it is not ``core``, are passed; every other ``STORE_*`` variable is removed
            from its environment, so it runs with the defaults).
        log_path: where its stderr goes.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def executable() -> str:
        """The ``store-svc`` console script next to the interpreter (or on ``$PATH``)."""
        beside = Path(sys.executable).parent / "store-svc"
        found = str(beside) if beside.exists() else shutil.which("store-svc")
        if found is None:
            raise FileNotFoundError("the store-svc console script is not installed")
        return found

    def start(self, timeout: float = 30.0) -> None:
        """Start the service and wait for its "running" log line.

        Raises:
            RuntimeError: it exited or did not log readiness in time.
        """
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("STORE_") and k != "ADMIN_TOKEN"
        }
        env["STORE_NATS_URL"] = self.settings.nats_url
        env["STORE_DATABASE_URL"] = self.settings.database_url
        if self.settings.ingest_mode != CORE:
            env["STORE_INGEST_MODE"] = self.settings.ingest_mode
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.executable(), "run"], env=env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"store-svc exited at start-up:\n{self.log_text()[-2000:]}")
            if "store-svc running" in self.log_text():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"store-svc not running after {timeout}s:\n{self.log_text()[-2000:]}")

    @property
    def pid(self) -> int:
        """The service's process id."""
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the service has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM, wait for the clean shutdown, and read its final counters.

        Returns:
            ``exit_code``, the shutdown line's counters (if logged) and any warning or
            error lines.
        """
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        text = self.log_text()
        out: dict[str, Any] = {"exit_code": code}
        if m := _STOPPED_LINE.search(text):
            keys = ("committed", "rejected", "dropped_messages", "received_messages")
            out.update({k: int(v) for k, v in zip(keys, m.groups(), strict=True) if v is not None})
        if m := _JS_STOPPED_LINE.search(text):
            keys = ("js_acked", "js_redelivered", "js_terminated", "js_handed_back")
            out.update({k: int(v) for k, v in zip(keys, m.groups(), strict=True)})
        problems = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]
        out["warnings_and_errors"] = problems[:10]
        return out


async def _probe(url: str, subject: str, timeout: float) -> None:
    """Wait until the service answers on ``subject`` (an empty write is refused at once
    with a 400 error reply, so the probe stores nothing)."""
    nc: NATS = await nats.connect(url, name="bench-probe")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await nc.request(subject, b"", timeout=1.0)
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def _probe_jetstream(url: str, settings: Settings, timeout: float) -> None:
    """Wait until the service's consumer has a pull request waiting (a probe write
    would be stored by the stream, so JetStream mode is probed this way)."""
    nc: NATS = await nats.connect(url, name="bench-probe-js")
    try:
        jsm = nc.jsm()
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await jsm.consumer_info(settings.js_stream, settings.js_durable)
                if info.num_waiting:
                    return
            except JsNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pull request on {settings.js_stream}/{settings.js_durable}")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def delete_stream(url: str, name: str) -> bool:
    """Delete a JetStream stream (and its consumers) if it exists.

    Returns:
        Whether there was one.
    """

    async def go() -> bool:
        nc: NATS = await nats.connect(url, name="bench-admin")
        try:
            return bool(await nc.jsm().delete_stream(name))
        except JsNotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(go())


def jetstream_state(url: str, settings: Settings) -> dict[str, Any]:
    """What the service's stream and consumer hold (after the service stopped)."""

    async def go() -> dict[str, Any]:
        nc: NATS = await nats.connect(url, name="bench-admin")
        try:
            jsm = nc.jsm()
            stream = await jsm.stream_info(settings.js_stream)
            consumer = await jsm.consumer_info(settings.js_stream, settings.js_durable)
            return {
                "stream_messages_left": stream.state.messages,
                "stream_last_seq": stream.state.last_seq,
                "consumer_ack_pending": consumer.num_ack_pending,
                "consumer_redelivered": consumer.num_redelivered,
                "consumer_pending": consumer.num_pending,
            }
        except JsNotFoundError as exc:
            return {"error": str(exc)}
        finally:
            await nc.close()

    return asyncio.run(go())


class CommitWatcher:
    """Polls a SQLite file until its trades table holds ``target`` rows, and notes when.

    A thread reads ``max(rowid)`` of the trades table every ``interval`` seconds on
    its own connection (an index-free, O(log n) read; on a fresh table that is never
    deleted from it equals the row count, and a WAL reader sees rows once committed).

    Args:
        db_path: the service's SQLite file.
        target: the row count that ends the run.
        interval: seconds between polls.
    """

    def __init__(self, db_path: Path, target: int, interval: float = 0.005) -> None:
        self.db_path = db_path
        self.target = target
        self.interval = interval
        self.rows = 0
        self.reached_at: float | None = None
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watcher", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.db_path, isolation_level=None)
                    row = conn.execute(f"SELECT max(rowid) FROM {KIND}").fetchone()
                    rows = int(row[0] or 0)
                except sqlite3.Error:
                    rows = self.rows  # not created yet, or busy: try again
                if rows != self.rows:
                    self.rows = rows
                    self.last_progress = now
                if rows >= self.target:
                    self.reached_at = now
                    return
                self._stop.wait(self.interval)
        finally:
            if conn is not None:
                conn.close()

    def wait(self, stall_timeout: float) -> float | None:
        """Wait until the target is reached, or no new row was seen for ``stall_timeout``.

        Returns:
            The ``time.monotonic`` of the first poll that saw the target, or None.
        """
        while self._thread.is_alive():
            self._thread.join(0.1)
            if time.monotonic() - self.last_progress > stall_timeout:
                break
        self._stop.set()
        self._thread.join()
        return self.reached_at


def count_rows(db_path: Path) -> int:
    """Rows in the trades table of a SQLite file."""
    with closing(sqlite3.connect(db_path)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {KIND}").fetchone()[0])


def is_postgres_url(database_url: str) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) database URL."""
    return database_url.startswith(("postgresql://", "postgres://"))


def count_rows_pg(database_url: str) -> int:
    """Rows in the trades table of a PostgreSQL database, read with asyncpg."""

    async def go() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {KIND}"))
        finally:
            await conn.close()

    return asyncio.run(go())


def count_stored(database_url: str) -> int:
    """Rows in the trades table of the database a service URL names.

    Args:
        database_url: ``sqlite:///<path>`` or ``postgresql://...``.

    Returns:
        The row count.
    """
    if is_postgres_url(database_url):
        return count_rows_pg(database_url)
    return count_rows(Path(database_url.removeprefix("sqlite:///")))


def create_pg_database(pg: PostgresServer, label: str) -> str:
    """Create a fresh, empty database on the run's PostgreSQL server.

    Args:
        pg: the running server.
        label: part of the name (anything; reduced to ``[a-z0-9_]``); a random suffix
            keeps every name unique.

    Returns:
        The new database's URL.
    """
    name = f"bench_{re.sub(r'[^a-z0-9]+', '_', label.lower())}_{secrets.token_hex(4)}"

    async def go() -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go())
    return pg.url(name)


# ------------------------------------------------------------------ measurements


def measure_bare_subscriber(
    url: str, settings: Settings, payload_file: Path, scenario: Scenario, publishers: int
) -> dict[str, Any]:
    """Ceiling A: a nats-py subscriber in its own process that only counts messages.

    Returns:
        Throughput, messages counted, and msgs/s and records/s.
    """
    subject = settings.subject("store", "write", ">")
    sub = _spawn("--bare-subscriber", SubscriberSpec(url, subject, settings.queue_group))
    try:
        _await_ready(sub)
        # Core publishers even for a JetStream scenario: ceiling A is its core twin's.
        core = replace(scenario, mode=CORE)
        results = run_publishers(
            url,
            settings.subject("store", "write", KIND),
            payload_file,
            scenario.messages,
            core,
            publishers,
        )
        _send_line(sub, "STOP")
        counted = _collect(sub, SubscriberResult, timeout=60.0)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    tp = summarize(results, scenario.per_msg)
    return {
        **tp.as_dict(),
        "received_msgs": counted.messages,
        "lost_msgs": tp.published_msgs - counted.messages,
        "slow_consumer_errors": counted.slow_consumer_errors,
        "msgs_per_s": counted.messages / tp.duration_s,
        "records_per_s": counted.messages * scenario.per_msg / tp.duration_s,
    }


def row_batches(
    decoder: PayloadDecoder, payloads: Sequence[bytes], batch_size: int
) -> Iterator[list[Row]]:
    """Validated rows of ``payloads`` in batches of ``batch_size`` (the last may be short).

    Decoding happens as the batches are drawn, outside the timed writes of the ceilings.
    """
    pending: list[Row] = []
    for payload in payloads:
        pending.extend(decoder.decode(KIND, None, payload, None, datetime.now(UTC)).rows)
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
    payloads: list[bytes], db_path: Path, settings: Settings
) -> dict[str, Any]:
    """Ceiling B: the same rows through plain ``sqlite3`` ``executemany``.

    Rows are decoded (untimed) one batch at a time, so memory stays small; then, per
    batch of ``batch_size`` rows, the conversion with ``to_sqlite_rows`` and the
    ``BEGIN IMMEDIATE; executemany; COMMIT`` are timed separately.

    Returns:
        Rows, the two timings and the rows/s of executemany alone and with conversion.
    """
    _open_schema(db_path)
    spec = KINDS[KIND]
    sql = upsert_sql(spec)
    decoder = PayloadDecoder(settings.max_payload_bytes, settings.max_future_skew_s)
    batch_size = settings.batch_size
    t_convert = t_insert = 0.0
    rows_total = 0
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")

        def commit(batch: list[Row]) -> None:
            nonlocal t_convert, t_insert, rows_total
            ingested_at = time_micros(datetime.now(UTC))
            t0 = time.perf_counter()
            params = to_sqlite_rows(spec, batch, ingested_at)
            t1 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, params)
            conn.execute("COMMIT")
            t2 = time.perf_counter()
            t_convert += t1 - t0
            t_insert += t2 - t1
            rows_total += len(batch)

        for batch in row_batches(decoder, payloads, batch_size):
            commit(batch)
    stored = count_rows(db_path)
    return {
        "rows": rows_total,
        "stored": stored,
        "batch_size": batch_size,
        "executemany_s": round(t_insert, 4),
        "convert_s": round(t_convert, 4),
        "rows_per_s": rows_total / t_insert,
        "convert_plus_executemany_rows_per_s": rows_total / (t_insert + t_convert),
    }


def measure_raw_copy_merge(
    payloads: list[bytes], database_url: str, settings: Settings
) -> dict[str, Any]:
    """Ceiling B for PostgreSQL: the same rows through plain asyncpg COPY + merge.

    The schema is created by opening (and closing) a :class:`PostgresSink` on the
    fresh database ``database_url``; the rows are decoded up front (untimed) into
    batches of ``batch_size``. Each batch is one transaction doing what the sink
    does: ``copy_records_to_table`` of :func:`staging_records` (built in the timed
    part) into the staging table (made once per connection) and the ``INSERT ...
    SELECT DISTINCT ON ... ON CONFLICT`` merge of :func:`merge_sql`. Two ways are
    timed, the table emptied between them: one connection, one transaction after
    another; and two connections taking turns, the next batch staged while the one
    ahead merges (as the sink does). The ceiling is the faster of the two. Runs on
    uvloop, as the service does.

    Args:
        payloads: the scenario's message bodies.
        database_url: a fresh, empty PostgreSQL database.
        settings: supplies ``batch_size`` and the decoder limits.

    Returns:
        Rows, rows stored, the seconds and rows/s of each way (records built and
        transactions), and ``rows_per_s`` of the faster (the ceiling).
    """
    return uvloop.run(_raw_copy_merge(payloads, database_url, settings))


async def _raw_copy_merge(
    payloads: list[bytes], database_url: str, settings: Settings
) -> dict[str, Any]:
    """The body of :func:`measure_raw_copy_merge` (inside the event loop)."""
    sink = PostgresSink(database_url)
    await sink.open()
    timescale = sink.timescale
    await sink.close()
    spec = KINDS[KIND]
    create, merge = merge_sql(spec)
    stage = f"stage_{KIND}"
    decoder = PayloadDecoder(settings.max_payload_bytes, settings.max_future_skew_s)
    batch_size = settings.batch_size
    batches = list(row_batches(decoder, payloads, batch_size))
    rows_total = sum(len(b) for b in batches)
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        for conn in conns:
            await conn.execute(create)

        async def stage_rows(conn: asyncpg.Connection, batch: list[Row]) -> Any:
            tx = conn.transaction()
            await tx.start()
            await conn.copy_records_to_table(stage, records=staging_records(KIND, batch))
            return tx

        async def merge_commit(conn: asyncpg.Connection, tx: Any) -> None:
            await conn.execute(merge)
            await tx.commit()

        # One connection, one transaction after another.
        t0 = time.perf_counter()
        for batch in batches:
            await merge_commit(conns[0], await stage_rows(conns[0], batch))
        sequential_s = time.perf_counter() - t0
        stored_sequential = int(await conns[0].fetchval(f"SELECT count(*) FROM {KIND}"))
        await conns[0].execute(f"TRUNCATE {KIND}")

        # Two connections taking turns, as the sink does: the next batch is staged
        # while the one ahead merges and commits; commits stay in order.
        t0 = time.perf_counter()
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
        stored = int(await conns[0].fetchval(f"SELECT count(*) FROM {KIND}"))
    finally:
        for conn in conns:
            await conn.close()
    return {
        "rows": rows_total,
        "stored": stored,
        "stored_sequential": stored_sequential,
        "batch_size": batch_size,
        "timescaledb": timescale,
        "sequential_s": round(sequential_s, 4),
        "overlapped_s": round(overlapped_s, 4),
        "sequential_rows_per_s": rows_total / sequential_s,
        "overlapped_rows_per_s": rows_total / overlapped_s,
        "rows_per_s": rows_total / min(sequential_s, overlapped_s),
    }


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample the service with py-spy (if installed) until the returned process is
    sent SIGINT."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print("py-spy is not installed in the venv; no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [str(exe), "record", "--pid", str(pid), "--format", "speedscope", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_py_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_latency(
    url: str,
    subject: str,
    payload_file: Path,
    rate: float,
    settings: Settings | None = None,
    window: int = 1_000,
) -> dict[str, Any]:
    """Run the paced request load and summarise its latencies.

    Args:
        url: the nats-server URL.
        subject: the write subject.
        payload_file: the paced load's messages.
        rate: messages a second.
        settings: given in JetStream mode (``ingest_mode``): the stream and consumer
            whose acks are watched.
        window: JetStream mode: outstanding PubAcks allowed.

    Returns:
        Rate asked and achieved, replies, and latency percentiles in ms.
    """
    if settings is not None and settings.ingest_mode == JETSTREAM:
        every = 1
        ack_subject = f"$JS.ACK.{settings.js_stream}.{settings.js_durable}.>"
        spec = PacedSpec(
            url,
            subject,
            str(payload_file),
            rate,
            timeout=60.0,
            mode=JETSTREAM,
            ack_subject=ack_subject,
            window=window,
        )
        measured_by = f"ack seen on {ack_subject} minus send time, every message"
    else:
        # About a thousand sampled requests a second, whatever the message rate.
        every = max(1, int(rate // 1000))
        spec = PacedSpec(url, subject, str(payload_file), rate, timeout=60.0, sample_every=every)
        measured_by = "reply to a request minus send time, sampled"
    proc = _spawn("--paced", spec)
    try:
        _await_ready(proc)
        _send_line(proc, _GO)
        res = _collect(proc, PacedResult, timeout=600.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lat = sorted(res.latencies_ms)
    return {
        "measured_by": measured_by,
        "rate_msgs_per_s": rate,
        "sampled_every": every,
        "achieved_msgs_per_s": res.achieved_rate,
        "messages": res.messages,
        "replies": res.replies,
        "error_replies": res.error_replies,
        "timed_out": res.timed_out,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else None,
        "mean_ms": sum(lat) / len(lat) if lat else None,
    }


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def measure_service(
    url: str,
    settings: Settings,
    workdir: Path,
    payload_file: Path,
    scenario: Scenario,
    opts: RunOptions,
    ts: TsAllocator,
) -> dict[str, Any]:
    """The real ``store-svc run``: throughput, row-count check, then latency at a
    fraction (default half) of the measured maximum.

    In JetStream mode (``settings.ingest_mode``) the stream is deleted first, so the
    service creates a fresh one, and again after the service stopped; the run ends
    when the database holds every published record (see :class:`CommitWatcher`).

    Returns:
        Throughput, stored and lost counts, the latency summary and the service's own
        shutdown counters.
    """
    on_js = settings.ingest_mode == JETSTREAM
    write_subject = settings.subject("store", "write", KIND)
    out_js: dict[str, Any] = {}
    if on_js:
        delete_stream(url, settings.js_stream)
    svc = ServiceProcess(settings, workdir / "service.log")
    try:
        svc.start()
        if on_js:
            asyncio.run(_probe_jetstream(url, settings, timeout=30.0))
        else:
            asyncio.run(_probe(url, write_subject, timeout=30.0))
        spy = None
        if opts.profile_dir is not None:
            out_file = opts.profile_dir / f"service-{scenario.name}.speedscope.json"
            spy = _start_py_spy(svc.pid, out_file)
        if spy is not None:
            time.sleep(1.0)  # let py-spy attach before the load starts
        watcher: CommitWatcher | None = None
        if on_js:
            watcher = CommitWatcher(
                Path(settings.database_url.removeprefix("sqlite:///")), scenario.records
            )
            watcher.start()
        try:
            results = run_publishers(
                url, write_subject, payload_file, scenario.messages, scenario, opts.publishers
            )
            committed_at = watcher.wait(stall_timeout=60.0) if watcher is not None else None
        finally:
            _stop_py_spy(spy)
        tp = summarize(results, scenario.per_msg)
        stored = count_stored(settings.database_url)
        out: dict[str, Any] = tp.as_dict()
        if watcher is not None:
            # The PubAcks end the publishers' part; the run ends at the last commit.
            start = min(r.first_publish for r in results)
            end = committed_at if committed_at is not None else time.monotonic()
            del out["flow_control_requests"], out["flow_control_replies"]
            out.update(
                {
                    "duration_s": round(end - start, 4),
                    "end": "all records committed (polled)"
                    if committed_at is not None
                    else "stalled (no new rows for 60 s)",
                    "pub_acks_owed": tp.requests,
                    "pub_acks": tp.replies,
                    "pub_ack_errors": tp.error_replies,
                    "stream_ingest_s": round(tp.duration_s, 4),
                    "stream_ingest_rows_per_s": tp.published_records / tp.duration_s,
                }
            )
            duration = end - start
        else:
            out["accepted_in_flow_control_replies"] = sum(r.accepted for r in results)
            duration = tp.duration_s
        out.update(
            {
                "stored": stored,
                "lost": tp.published_records - stored,
                "rows_per_s": stored / duration,
                "msgs_per_s": stored / scenario.per_msg / duration,
            }
        )

        # Latency at a fraction of the measured maximum, on fresh records.
        rate = max(1.0, out["msgs_per_s"] * opts.latency_fraction)
        n_lat = max(20, int(rate * scenario.latency_seconds))
        lat_file = workdir / "latency.msgpack"
        first_us = ts.take(n_lat * scenario.per_msg)
        save_payloads(lat_file, make_payloads(scenario.per_msg, n_lat, first_us, seed=2))
        latency = measure_latency(
            url, write_subject, lat_file, rate, settings=settings, window=scenario.window
        )
        if on_js and latency["timed_out"]:
            # Not every ack was seen; the last rows may still be committing.
            _wait_rows(settings.database_url, stored + n_lat * scenario.per_msg, 10.0)
        after = count_stored(settings.database_url)
        latency["fraction_of_max"] = opts.latency_fraction
        latency["stored"] = after - stored
        latency["lost"] = n_lat * scenario.per_msg - (after - stored)
        out["latency"] = latency
    finally:
        shutdown = svc.stop()
        if on_js:
            out_js = jetstream_state(url, settings)
            delete_stream(url, settings.js_stream)
    out["service_shutdown"] = shutdown
    if on_js:
        out["jetstream"] = out_js
    return out


def _wait_rows(database_url: str, target: int, timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until the database holds ``target`` rows."""
    deadline = time.monotonic() + timeout
    while count_stored(database_url) < target and time.monotonic() < deadline:
        time.sleep(0.1)


# ------------------------------------------------------------------- orchestration


def machine_info() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server = subprocess.run(
        [find_nats_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "nats_server": server,
        "packages": {
            name: metadata.version(name)
            for name in (
                "market-data-store",
                "nats-py",
                "msgspec",
                "uvloop",
                "asyncpg",
                "market-data-core",
            )
        },
        "loadavg_at_start": os.getloadavg(),
        "git": _git_state(),
    }


def _pg_version() -> str:
    """The version of the PostgreSQL server binaries the run uses."""
    return subprocess.run(
        [str(find_pg_bin() / "pg_ctl"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def _git_state() -> dict[str, Any]:
    """The commit of the code under test and whether ``store_svc`` has local changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "store_svc_changed": bool(git("status", "--porcelain", "store_svc")),
    }


def run_scenario(
    scenario: Scenario,
    url: str,
    workdir: Path,
    ts: TsAllocator,
    opts: RunOptions,
    pg: PostgresServer | None = None,
    twin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All measurements of one scenario, on the same payloads.

    Args:
        scenario: the workload.
        url: the nats-server URL.
        workdir: a fresh temporary directory for payloads, logs and SQLite files.
        ts: hands out the records' timestamps.
        opts: run-wide options.
        pg: the run's PostgreSQL server (required for a PostgreSQL scenario).
        twin: for a JetStream scenario, the report of its core twin when that ran
            earlier in this invocation: its ceilings are reused.

    Returns:
        The scenario's section of the JSON report.

    Raises:
        ValueError: a PostgreSQL scenario without a server, or a JetStream scenario
            on PostgreSQL.
    """
    on_pg = scenario.sink == POSTGRESQL
    on_js = scenario.mode == JETSTREAM
    if on_pg and pg is None:
        raise ValueError(f"scenario {scenario.name} needs a PostgreSQL server")
    if on_pg and on_js:
        raise ValueError(f"scenario {scenario.name}: JetStream scenarios use SQLite only")
    settings = Settings.model_construct(
        nats_url=url,
        database_url=f"sqlite:///{(workdir / 'service.db').resolve()}",
        ingest_mode=JETSTREAM if on_js else CORE,
    )
    ceiling = "raw COPY+merge" if on_pg else "raw executemany"
    raw_key = "raw_copy_merge" if on_pg else "raw_executemany"
    # No stream may capture the write subjects outside a JetStream service's run.
    delete_stream(url, settings.js_stream)

    def say(text: str) -> None:
        print(f"[{scenario.name}] {text}", file=sys.stderr, flush=True)

    say(f"generating {scenario.messages:,} messages x {scenario.per_msg} records")
    t0 = time.monotonic()
    payloads = make_payloads(scenario.per_msg, scenario.messages, ts.take(scenario.records), 1)
    payload_file = workdir / "throughput.msgpack"
    save_payloads(payload_file, payloads)
    ceilings_from = scenario.name
    if twin is not None and raw_key in twin:
        # The core twin's ceilings, measured earlier in this run on payloads alike.
        ceilings_from = twin["name"]
        bare, raw = twin["bare_subscriber"], twin[raw_key]
        say(f"generated in {time.monotonic() - t0:.1f}s; ceilings of {ceilings_from}")
    else:
        say(f"generated in {time.monotonic() - t0:.1f}s; ceiling A: bare subscriber")
        bare = measure_bare_subscriber(url, settings, payload_file, scenario, opts.publishers)
        say(f"bare subscriber: {bare['records_per_s']:,.0f} records/s; ceiling B: {ceiling}")
        if pg is not None and on_pg:
            raw = measure_raw_copy_merge(
                payloads, create_pg_database(pg, f"{scenario.name}-raw"), settings
            )
        else:
            raw = measure_raw_executemany(payloads, workdir / "raw.db", settings)
    if pg is not None and on_pg:
        # The service gets a database of its own, created just before it starts.
        settings = Settings.model_construct(
            nats_url=url, database_url=create_pg_database(pg, f"{scenario.name}-service")
        )
    del payloads
    say(f"{ceiling}: {raw['rows_per_s']:,.0f} rows/s; the service ({scenario.mode} mode)")
    svc = measure_service(url, settings, workdir, payload_file, scenario, opts, ts)
    say(
        f"service: {svc['rows_per_s']:,.0f} rows/s, lost {svc['lost']}, latency p99 "
        f"{_fmt(svc['latency']['p99_ms'], '.1f')} ms"
    )
    ratios = {"service_vs_bare_subscriber": svc["rows_per_s"] / bare["records_per_s"]}
    if twin is not None:
        ratios["service_vs_core_twin_service"] = svc["rows_per_s"] / twin["service"]["rows_per_s"]
    if on_pg:
        ratios["service_vs_raw_copy_merge"] = svc["rows_per_s"] / raw["rows_per_s"]
        ratios["service_vs_raw_copy_merge_one_connection"] = (
            svc["rows_per_s"] / raw["sequential_rows_per_s"]
        )
    else:
        ratios["service_vs_raw_executemany"] = svc["rows_per_s"] / raw["rows_per_s"]
        ratios["service_vs_raw_convert_plus_executemany"] = (
            svc["rows_per_s"] / raw["convert_plus_executemany_rows_per_s"]
        )
    flow_control: dict[str, Any] = (
        {"pub_ack_window_msgs": scenario.window}
        if on_js
        else {"chunk_msgs": scenario.chunk, "window_requests": scenario.window}
    )
    return {
        "name": scenario.name,
        "mode": scenario.mode,
        "sink": scenario.sink,
        "records_per_msg": scenario.per_msg,
        "messages": scenario.messages,
        "flow_control": flow_control,
        "publishers": opts.publishers,
        "ceilings_from": ceilings_from,
        "bare_subscriber": bare,
        raw_key: raw,
        "service": svc,
        "ratios": ratios,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(scenario: dict[str, Any], spec: str, *path: str) -> str:
    """A table cell: the value at ``path`` in a scenario's report, formatted with
    ``spec``, or ``-`` where the scenario has no such value (e.g. the other sink's
    ceiling)."""
    value: Any = scenario
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return "-"
        value = value[key]
    return _fmt(value, spec)


def targets(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the targets (ratios, and p99 latency of every core scenario) against the
    results. JetStream scenarios have no targets: their numbers are for information."""
    out: list[dict[str, Any]] = []
    by_name = {s["name"]: s for s in scenarios}
    checks = [
        ("single", "service_vs_bare_subscriber", TARGET_SINGLE_VS_BARE, ">="),
        ("batch500", "service_vs_raw_executemany", TARGET_BATCH_VS_RAW, ">="),
        ("batch500-pg", "service_vs_raw_copy_merge", TARGET_BATCH_PG_VS_RAW, ">="),
    ]
    for name, ratio, target, op in checks:
        if name in by_name:
            value = by_name[name]["ratios"][ratio]
            out.append(
                {
                    "scenario": name,
                    "metric": ratio,
                    "value": value,
                    "target": target,
                    "op": op,
                    "met": value >= target,
                    "margin": value - target,
                }
            )
    for s in scenarios:
        if s.get("mode", CORE) != CORE:
            continue
        p99 = s["service"]["latency"]["p99_ms"]
        out.append(
            {
                "scenario": s["name"],
                "metric": "latency_p99_ms",
                "at_fraction_of_max": s["service"]["latency"]["fraction_of_max"],
                "value": p99,
                "target": TARGET_P99_MS,
                "op": "<=",
                "met": p99 is not None and p99 <= TARGET_P99_MS,
                "margin": None if p99 is None else TARGET_P99_MS - p99,
            }
        )
    return out


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary: one column per scenario."""
    scenarios = report["scenarios"]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(s) for s in scenarios]))

    add("mode", lambda s: str(s.get("mode", CORE)))
    add("sink", lambda s: str(s.get("sink", SQLITE)))
    add("ceilings measured in", lambda s: str(s.get("ceilings_from", s["name"])))
    add("records per message", lambda s: f"{s['records_per_msg']}")
    add("published records", lambda s: f"{s['service']['published_records']:,}")
    add("stored records", lambda s: f"{s['service']['stored']:,}")
    add("lost records", lambda s: f"{s['service']['lost']:,}")
    add("service duration s", lambda s: f"{s['service']['duration_s']:.2f}")
    add("service msgs/s", lambda s: f"{s['service']['msgs_per_s']:,.0f}")
    add("service rows/s", lambda s: f"{s['service']['rows_per_s']:,.0f}")
    add(
        "JS stream ingest rows/s (to last PubAck)",
        lambda s: _cell(s, ",.0f", "service", "stream_ingest_rows_per_s"),
    )
    add("A bare subscriber msgs/s", lambda s: f"{s['bare_subscriber']['msgs_per_s']:,.0f}")
    add("A bare subscriber records/s", lambda s: f"{s['bare_subscriber']['records_per_s']:,.0f}")
    add("A lost msgs", lambda s: f"{s['bare_subscriber']['lost_msgs']:,}")
    add(
        "A publisher msgs/s (sending only)",
        lambda s: f"{s['bare_subscriber']['publish_msgs_per_s']:,.0f}",
    )
    add("B raw executemany rows/s", lambda s: _cell(s, ",.0f", "raw_executemany", "rows_per_s"))
    add(
        "B raw convert+executemany rows/s",
        lambda s: _cell(s, ",.0f", "raw_executemany", "convert_plus_executemany_rows_per_s"),
    )
    add("B raw COPY+merge rows/s", lambda s: _cell(s, ",.0f", "raw_copy_merge", "rows_per_s"))
    add(
        "B raw COPY+merge, 1 connection rows/s",
        lambda s: _cell(s, ",.0f", "raw_copy_merge", "sequential_rows_per_s"),
    )
    add(
        "B raw COPY+merge, 2 overlapped rows/s",
        lambda s: _cell(s, ",.0f", "raw_copy_merge", "overlapped_rows_per_s"),
    )
    add("service / A bare subscriber", lambda s: f"{s['ratios']['service_vs_bare_subscriber']:.3f}")
    add(
        "service / B raw executemany",
        lambda s: _cell(s, ".3f", "ratios", "service_vs_raw_executemany"),
    )
    add(
        "service / B convert+executemany",
        lambda s: _cell(s, ".3f", "ratios", "service_vs_raw_convert_plus_executemany"),
    )
    add(
        "service / B raw COPY+merge",
        lambda s: _cell(s, ".3f", "ratios", "service_vs_raw_copy_merge"),
    )
    add(
        "service / core twin's service",
        lambda s: _cell(s, ".3f", "ratios", "service_vs_core_twin_service"),
    )
    add("latency load msgs/s", lambda s: f"{s['service']['latency']['achieved_msgs_per_s']:,.0f}")
    add(
        "latency load rows/s",
        lambda s: f"{s['service']['latency']['achieved_msgs_per_s'] * s['records_per_msg']:,.0f}",
    )
    for p in ("p50", "p95", "p99", "max"):
        add(f"latency {p} ms", lambda s, p=p: _fmt(s["service"]["latency"][f"{p}_ms"], ".2f"))
    add("latency lost records", lambda s: f"{s['service']['latency']['lost']:,}")
    add(
        "latency measured by",
        lambda s: "ack" if s.get("mode", CORE) == JETSTREAM else "reply",
    )
    add(
        "service dropped msgs (own log)",
        lambda s: str(s["service"]["service_shutdown"].get("dropped_messages", "?")),
    )

    width = max(len(label) for label, _ in rows)
    cols = [max(len(s["name"]), *(len(r[1][i]) for r in rows)) for i, s in enumerate(scenarios)]
    head = (
        " " * width
        + "  "
        + "  ".join(s["name"].rjust(c) for s, c in zip(scenarios, cols, strict=True))
    )
    print(head)
    print("-" * len(head))
    for label, values in rows:
        print(
            label.ljust(width)
            + "  "
            + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        )
    print()
    if any(s.get("mode", CORE) == JETSTREAM for s in scenarios):
        print("JetStream scenarios (mode jetstream) have no targets; their numbers are info.")
    for t in report["targets"]:
        verdict = "met" if t["met"] else "MISSED"
        value = _fmt(t["value"], ".3f")
        margin = _fmt(t["margin"], "+.3f")
        print(
            f"target {t['scenario']:>11} {t['metric']:<28} {value:>8} {t['op']} {t['target']:<6}"
            f" {verdict} (margin {margin})"
        )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every scenario on one private nats-server and build the report."""
    scenarios: tuple[Scenario, ...] = QUICK if args.quick else FULL
    if args.only:
        scenarios = tuple(s for s in scenarios if s.name in args.only)
    info = machine_info()
    opts = RunOptions(
        publishers=args.publishers,
        latency_fraction=args.latency_fraction,
        profile_dir=RESULTS_DIR if args.py_spy else None,
    )
    if opts.profile_dir is not None:
        opts.profile_dir.mkdir(parents=True, exist_ok=True)
    ts = TsAllocator()
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        # JetStream is always on (its store in a temporary folder); core scenarios
        # run while no stream exists, so it does not touch them.
        js_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-nats-"))
        if args.keep:
            stack.callback(print, f"kept {js_dir}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, js_dir, ignore_errors=True)
        server = stack.enter_context(NatsServer(store_dir=js_dir))
        print(f"nats-server on {server.url} (JetStream store {js_dir})", file=sys.stderr)
        pg: PostgresServer | None = None
        if any(s.sink == POSTGRESQL for s in scenarios):
            pg = PostgresServer()
            stack.callback(pg.remove)  # also after a failed start: the folder goes
            pg.start()
            print(f"PostgreSQL on {pg.dsn}", file=sys.stderr)
            info["postgresql"] = _pg_version()
        for scenario in scenarios:
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{scenario.name}-"))
            done = {r["name"]: r for r in results}
            twin = done.get(scenario.core_twin) if scenario.core_twin else None
            try:
                results.append(run_scenario(scenario, server.url, workdir, ts, opts, pg, twin))
            finally:
                if args.keep:
                    print(f"kept {workdir}", file=sys.stderr)
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_at_end"] = os.getloadavg()
    info["git_at_end"] = _git_state()
    defaults = Settings.model_construct().model_dump(
        exclude={"admin_token", "nats_url", "database_url"}
    )
    return {
        "benchmark": "ingest",
        "mode": "quick" if args.quick else "full",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.monotonic() - started, 1),
        "machine": info,
        "service_settings": defaults,
        "publishers": args.publishers,
        "latency_fraction_of_max": args.latency_fraction,
        "scenarios": results,
        "targets": targets(results),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (the internal roles are hidden from ``--help``)."""
    parser = argparse.ArgumentParser(
        description="Benchmark store-svc ingest: throughput vs a bare NATS subscriber and "
        "raw sqlite3 executemany (or raw asyncpg COPY + merge for PostgreSQL), and "
        "publish→commit latency at half the maximum rate; core and JetStream modes.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, about a minute (CI smoke run)"
    )
    parser.add_argument(
        "--publishers", type=int, default=1, help="publisher processes per run (default 1)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON report (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="record a py-spy speedscope profile of the service during each throughput run "
        "(into benchmarks/results/; needs py-spy in the venv)",
    )
    parser.add_argument(
        "--latency-fraction",
        type=float,
        default=0.5,
        help="latency load as a fraction of the measured maximum (default 0.5; the "
        "p99 target is defined at 0.5)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.name for s in FULL],
        help="run only this scenario (repeatable)",
    )
    roles = parser.add_mutually_exclusive_group()
    for role in ("--publisher", "--paced", "--bare-subscriber"):
        roles.add_argument(role, metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publishers < 1:
        parser.error("--publishers must be at least 1")
    if not 0 < args.latency_fraction <= 1:
        parser.error("--latency-fraction must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: an internal role, or the whole benchmark."""
    args = parse_args(argv)
    if args.publisher:
        pub = uvloop.run(publisher_role(msgspec.json.decode(args.publisher, type=PublisherSpec)))
        print(msgspec.json.encode(pub).decode(), flush=True)
        return 0
    if args.paced:
        paced = uvloop.run(paced_role(msgspec.json.decode(args.paced, type=PacedSpec)))
        print(msgspec.json.encode(paced).decode(), flush=True)
        return 0
    if args.bare_subscriber:
        spec = msgspec.json.decode(args.bare_subscriber, type=SubscriberSpec)
        sub = uvloop.run(bare_subscriber_role(spec))
        print(msgspec.json.encode(sub).decode(), flush=True)
        return 0
    report = run_benchmark(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nJSON report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
