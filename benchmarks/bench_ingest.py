"""Ingest benchmark of ``store-svc``: a scenario matrix against ceilings, in one command.

How to run (from the repository root, in the project's venv)::

    .venv/bin/python benchmarks/bench_ingest.py            # full preset, ~19 min on 2 cores
    .venv/bin/python benchmarks/bench_ingest.py --quick    # CI smoke run, <= 5 min on 2 cores
    .venv/bin/python benchmarks/bench_ingest.py --only 'core-sqlite-*'
    .venv/bin/python benchmarks/bench_ingest.py --only 'jetstream-*-1000-*,rss-full-queue'
    .venv/bin/python benchmarks/bench_ingest.py --only 'mixed-query-*'   # ~2 min
    .venv/bin/python benchmarks/bench_ingest.py --list     # the scenario names

``--only`` takes comma-separated ``fnmatch`` patterns (and may be repeated); a
``scaleout-*`` scenario brings its single-instance twin along, for its ratio.
Results: tables on stdout, and in ``--output-dir`` (default ``benchmarks/results``)
``ingest.json`` (every measurement, the machine and the settings), ``throughput.png``
and ``latency.png``. A progress bar on stderr shows the scenario and phase (when
stderr is a terminal; ``--progress always`` forces it). The exit code is 1 when a
scenario lost records, a service crashed or a scenario could not run; missed
targets never change it.

Presets: ``--quick`` publishes 8,000 / 120 / 16 messages per throughput phase (1 / 100
/ 1000 records per message) and runs 0.75 s latency phases: a smoke test whose numbers
mean little. The full preset (the default) publishes 300,000 / 8,000 / 800 messages
(300,000 / 800,000 / 800,000 records: about 5 to 17 s per phase on 2 cores) and runs
8 s latency phases; it took 17 minutes on 2 cores (a busy machine) before the
mixed-load scenarios, which add about 100 s. Mixed load: 500 (quick) / 8,000 (full)
messages of 100 trades per ingest phase, a query load of 10 + 10 (quick) / 20 + 20
(full) requests a second, and a closed-loop query run of 1 s (quick) / 4 s (full);
both mixed scenarios take about 12 s in ``--quick``.

Everything runs on one private ``nats-server`` with JetStream enabled (store in a
temporary folder) and, when a PostgreSQL scenario is selected, one throwaway
PostgreSQL server (:class:`~store_svc.devtools.pgserver.PostgresServer`), all removed at the
end, so the ratios compare like with like on the same (possibly busy) machine.

**Scenarios.** The matrix is ingest mode (``core``, ``jetstream``) x sink (``sqlite``,
``postgresql``) x records per message (1, 100, 1000) x kind (``trades``, ``bars``):
24 scenarios named ``<mode>-<sink>-<records per message>-<kind>``, e.g.
``core-sqlite-1-trades`` or ``jetstream-postgresql-1000-bars``. Each runs the real
``store-svc run`` console script as a subprocess with default settings except
``STORE_NATS_URL``, ``STORE_DATABASE_URL`` (a fresh SQLite file, or a fresh
PostgreSQL database) and ``STORE_INGEST_MODE``. Payloads are built once per (records
per message, kind) with :func:`store_svc.devtools.demo.synthetic_records`, every record 1 µs
after the one before, so no two records share an idempotency key (bars: symbol,
resolution, ts; trades: symbol, ts, price, size, exchange, conditions) and upserts
merge nothing. Extras:

* ``scaleout-core-postgresql-1000-trades``, ``scaleout-jetstream-postgresql-1000-trades``:
  two service instances (core: the same queue group; JetStream: the same durable
  consumer) on one PostgreSQL database; aggregate rows/s and the ratio to the
  single-instance scenario of the same run.
* ``rss-full-queue``: one service with default settings (queue capacity 100,000
  records) on a SQLite file that the harness locks (``BEGIN EXCLUSIVE``) so commits
  stall; 1000-record trade messages are published until feedback says ``hard`` and
  then until the queue is full (read from the health endpoint); the service tree's
  RSS is read; the lock is released and every published record must get stored.
* ``mixed-query-sqlite``, ``mixed-query-postgresql``: ingest with and without a
  concurrent load on the read API (see **Mixed load** below).

**Ceilings**, measured in the same run and shared: A once per (records per message,
kind), B once per (sink, records per message, kind), on the same payloads.

* **A, bare subscriber**: a nats-py subscriber in its own process that only counts
  messages (records/s = messages x records per message), fed by the same core
  publishers and flow control as a core service (JetStream scenarios share it: what
  one Python subscriber can take off NATS).
* **B, raw sink insert** of the same rows into the same schema, outside the service:
  SQLite: plain ``sqlite3`` ``executemany`` of the sink's upsert (WAL, same
  ``synchronous``), one transaction per ``batch_size`` rows, decode and conversion
  untimed; PostgreSQL: plain asyncpg ``copy_records_to_table`` into the sink's
  staging table + the sink's merge, one transaction per ``batch_size`` rows, timed on
  one connection and on two connections taking turns; the faster is the ceiling.

**Throughput** is committed rows/s: rows stored over the time from the first publish
to the moment the last record is committed. Publishers are separate processes
(``ingest_roles.py``) released together. Core: every ``chunk``-th message is a
request and at most ``window`` requests are unanswered (core NATS has no
back-pressure; the window keeps the queue below the hard watermark, where the
service refuses requests); the service answers a request after its commit and
commits in FIFO order, so the last reply ends the run. JetStream: the service creates
the stream ``STORE_WRITES`` (workqueue) and the durable ``store`` and acks after
commit; publishers use ``js.publish_async`` with at most ``window`` PubAcks
outstanding; the run ends when the stream has taken every message and holds none
(an acked message leaves a workqueue stream), polled every 10 ms. The stream is
deleted before and after every scenario, so core scenarios run with no stream.
During the throughput phase the harness counts the events on
``mdp.telemetry.feedback`` per level (``ok``/``soft``/``hard``; the 5 s heartbeat
included). From the service's start to its stop it samples the RSS of the service's
process tree (the ``store-svc`` process plus its children, e.g. the SQLite writer
process; summed per process) with psutil, every 0.1 s (0.05 s in ``--quick``); the
peak is reported, and the JSON also has the peak of the throughput phase alone.
After each phase the stored rows are counted (waiting while the count still grows,
when a refusal or a time-out ended the phase early): ``lost`` = published - stored -
refused, where refused are the records of messages answered with an error (a core
request at the hard watermark gets a 503; a failed PubAck), reported apart. ``lost``
must be 0.

**Latency**, publish→commit p50/p95/p99, at 50 % and at 90 % of the scenario's
measured maximum msgs/s (the throughput phase's rate): a paced publisher (its own
process) sends fresh records at that rate for the preset's phase length, in bursts of
what is due every millisecond. Core: about a thousand messages a second are
requests (sampled), the rest plain publishes sharing their batches; latency is the
reply's arrival minus the send time (the reply is sent after commit: an upper bound
of publish→commit). JetStream: every message is a JetStream publish; the paced
process also subscribes to ``$JS.ACK.STORE_WRITES.store.>`` (it gets a copy of every
ack the service sends after a commit), matches acks to messages by stream sequence,
and latency is the ack's arrival minus the send time, for every message. On a
2-core machine the paced publisher, the service, its SQLite writer and nats-server
share the cores, so latency near the maximum includes CPU contention.

**Mixed load** (``mixed-query-<sink>``): does a query load slow ingest down? One
service (core mode, default settings, so ``STORE_QUERY_CONCURRENCY`` 2: two SQLite
reader processes, or a read-only pool of two PostgreSQL connections) on a fresh
SQLite file or PostgreSQL database, started and probed as in the matrix. Three ingest
phases of 100-record trade messages, each on fresh records (three payload sets with
disjoint timestamps from the run's allocator, so no phase republishes records, which
would be cheap no-op upserts), with the matrix's core publishers and flow control and
the same end (the last reply) and row count check (``lost`` must be 0): (a) ingest
alone, (b) ingest with the query load, (c) ingest alone again. The ratio is b's
committed rows/s over the mean of a's and c's (the mean evens out a drift over the
run, e.g. a growing database or a neighbour's load).

The query load is its own process (``ingest_roles.py --query-load``), started before
b's publishers (``GO`` about half a second before the first publish, while they start)
and stopped (``STOP``) after the last reply. Four page workers, each on its own
cursor chain (AAPL; MSFT and NVDA in one query; AMZN; GOOG: symbols the synthetic
records use, about 1/8 of the records each), ask ``mdp.store.query.trades`` for the
time range of phase a's records (``start`` = its first record, included; ``end`` =
1 µs after its last, excluded; exact RFC 3339 text) with ``limit`` 1000, follow
``next_cursor`` and start again at the first page when it is null; two latest
workers ask ``mdp.store.latest.trades`` for the 8 synthetic symbols and 2 that are
never written. Each endpoint has a fixed rate (20 pages/s and 20 latest/s in full,
10 + 10 in quick), shared by its workers, each paced on its own schedule (behind
schedule it asks at once; nothing is skipped, so a rate the service cannot keep
shows as an achieved rate below the asked one); a worker waits for its reply before
its next request, and at most 4 requests are in flight in all. Latency is request to
reply per successful request (p50/p95/p99 per endpoint and per page chain); error
replies are counted by ``Nats-Service-Error-Code`` (and time-outs after 10 s);
records are counted (decoded as ``msgspec.Raw``, so the client costs little CPU).
Every complete pass of a chain is checked against the records of its symbols in phase
a, every latest reply against the 8 symbols (a mismatch is a note). Then, with no
ingest, the same client runs closed-loop (every page worker asks again as soon as
its reply is in, latest workers off, still at most 4 in flight) for 4 s (1 s in
quick): the read path's maximum pages/s and records/s. For every phase the CPU
seconds of the service tree (with its SQLite writer and readers), nats-server, the
PostgreSQL server (with its reaped backends and parallel workers) and the harness'
roles (publishers, query client) are reported, and the cores they kept busy.

Targets (printed with met/missed and margin): core 1 record/msg >= 0.85 x A;
1000 records/msg >= 0.9 x B (core) and >= 0.7 x B (JetStream); p99 <= 20 ms at 50 %
of the maximum (every scenario); RSS <= 300 MB at full queue; mixed load: b >= 0.8 x
mean(a, c).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import nats
from nats.aio.client import Client as NATS
from tqdm import tqdm

from benchmarks.ingest_ceilings import (
    measure_bare_subscriber,
    measure_raw_copy_merge,
    measure_raw_executemany,
)
from benchmarks.ingest_infra import (
    CpuMeter,
    FeedbackCounter,
    FlowControl,
    LoopThread,
    RssSampler,
    ServiceProcess,
    await_ready,
    collect,
    count_stored,
    create_pg_database,
    delete_stream,
    drop_pg_database,
    git_state,
    jetstream_state,
    machine_info,
    pg_version,
    postmaster_pid,
    probe_core,
    probe_jetstream,
    reap,
    run_publishers,
    send_line,
    service_settings,
    spawn,
    start_py_spy,
    stop_py_spy,
    summarize,
    wait_rows,
    wait_stream_drained,
)
from benchmarks.ingest_report import print_report, targets, write_charts
from benchmarks.ingest_roles import (
    _GO,
    _STOP,
    CLOSED_LOOP,
    CORE,
    JETSTREAM,
    PacedResult,
    PacedSpec,
    PublishResult,
    QueryLoadResult,
    QueryLoadSpec,
    load_payloads,
    save_payloads,
)
from store_svc.devtools.demo import SYMBOLS, synthetic_records
from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.pgserver import PostgresServer
from store_svc.settings import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
MODES = (CORE, JETSTREAM)
SINKS = (SQLITE, POSTGRESQL)
RECORDS_PER_MSG = (1, 100, 1000)
RECORD_KINDS = ("trades", "bars")
LATENCY_FRACTIONS = (0.5, 0.9)
RSS_FULL_QUEUE = "rss-full-queue"
SCALEOUT_PREFIX = "scaleout-"
MIXED_PREFIX = "mixed-query-"
#: The ingest of the mixed-load scenarios: core mode, 100-record trade messages.
MIXED_PER_MSG = 100
MIXED_KIND = "trades"
#: The symbols of each page worker of the query client (one cursor chain each); the
#: synthetic records spread evenly over :data:`store_svc.devtools.demo.SYMBOLS`.
QUERY_CHAINS = (("AAPL",), ("MSFT", "NVDA"), ("AMZN",), ("GOOG",))
#: Latest lookups ask for every synthetic symbol and two that are never written.
LATEST_SYMBOLS = (*SYMBOLS, "IBM", "ORCL")
LATEST_WORKERS = 2
QUERY_PAGE_LIMIT = 1000
#: Requests the query client keeps in flight at most (both endpoints together).
QUERY_IN_FLIGHT = 4

#: The defaults the service runs with (only URLs and the mode are set).
DEFAULTS = Settings.model_construct()

_T = TypeVar("_T")


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Scenario:
    """One service scenario of the matrix (or a scale-out one).

    Attributes:
        mode: the service's ingest mode, ``core`` or ``jetstream``.
        sink: ``sqlite`` or ``postgresql``.
        per_msg: records per message.
        kind: ``trades`` or ``bars``.
        instances: service instances sharing the work (2 for scale-out).
    """

    mode: str
    sink: str
    per_msg: int
    kind: str
    instances: int = 1

    @property
    def base_name(self) -> str:
        """The matrix name, ``<mode>-<sink>-<per_msg>-<kind>``."""
        return f"{self.mode}-{self.sink}-{self.per_msg}-{self.kind}"

    @property
    def name(self) -> str:
        """The scenario's name (``scaleout-`` in front for several instances)."""
        return f"{SCALEOUT_PREFIX}{self.base_name}" if self.instances > 1 else self.base_name


MATRIX = tuple(
    Scenario(mode, sink, per_msg, kind)
    for mode in MODES
    for sink in SINKS
    for per_msg in RECORDS_PER_MSG
    for kind in RECORD_KINDS
)
SCALEOUT = tuple(Scenario(mode, POSTGRESQL, 1000, "trades", instances=2) for mode in MODES)


@dataclass(frozen=True)
class MixedScenario:
    """A mixed-load scenario: ingest with and without a concurrent query load.

    Attributes:
        sink: ``sqlite`` or ``postgresql``.
    """

    sink: str

    @property
    def name(self) -> str:
        """``mixed-query-<sink>``."""
        return f"{MIXED_PREFIX}{self.sink}"


MIXED = tuple(MixedScenario(sink) for sink in SINKS)
ALL_NAMES = (
    *(s.name for s in MATRIX),
    *(s.name for s in SCALEOUT),
    *(s.name for s in MIXED),
    RSS_FULL_QUEUE,
)


@dataclass(frozen=True)
class Preset:
    """Sizes of a run.

    Attributes:
        name: ``quick`` or ``full``.
        messages: messages per throughput phase, by records per message.
        chunk: core flow control: every ``chunk``-th message is a request.
        window: core flow control: unanswered requests a publisher allows.
        js_window: JetStream: outstanding PubAcks a publisher allows.
        latency_seconds: length of each paced latency phase.
        rss_interval: seconds between RSS samples.
        mixed_messages: mixed-load scenarios: 100-record messages per ingest phase.
        query_rate: mixed-load scenarios: page queries a second of the query load.
        latest_rate: mixed-load scenarios: latest lookups a second of the query load.
        queries_alone_seconds: mixed-load scenarios: length of the closed-loop query
            run without ingest.
    """

    name: str
    messages: dict[int, int]
    chunk: dict[int, int]
    window: dict[int, int]
    js_window: dict[int, int]
    latency_seconds: float
    rss_interval: float
    mixed_messages: int
    query_rate: float
    latest_rate: float
    queries_alone_seconds: float

    def flow(self, mode: str, per_msg: int) -> FlowControl:
        """The flow control of a throughput publisher.

        Core: at most ``chunk * window`` records unanswered (40,000 here), below the
        service's soft and hard marks (50 % and 80 % of 100,000), so the throughput
        phase never reaches ``hard``, where requests would be refused.
        """
        if mode == JETSTREAM:
            return FlowControl(chunk=1, window=self.js_window[per_msg])
        return FlowControl(chunk=self.chunk[per_msg], window=self.window[per_msg])


_CHUNK = {1: 4_000, 100: 40, 1000: 4}
_WINDOW = {1: 10, 100: 10, 1000: 10}
_JS_WINDOW = {1: 1_000, 100: 100, 1000: 20}

QUICK = Preset(
    "quick",
    messages={1: 8_000, 100: 120, 1000: 16},
    chunk={1: 2_000, 100: 20, 1000: 4},
    window=_WINDOW,
    js_window=_JS_WINDOW,
    latency_seconds=0.75,
    rss_interval=0.05,
    mixed_messages=500,
    query_rate=10.0,
    latest_rate=10.0,
    queries_alone_seconds=1.0,
)
FULL = Preset(
    "full",
    messages={1: 300_000, 100: 8_000, 1000: 800},
    chunk=_CHUNK,
    window=_WINDOW,
    js_window=_JS_WINDOW,
    latency_seconds=8.0,
    rss_interval=0.1,
    mixed_messages=8_000,
    query_rate=20.0,
    latest_rate=20.0,
    queries_alone_seconds=4.0,
)


# ------------------------------------------------------------------------ payloads


class TsAllocator:
    """Hands out disjoint microsecond ranges, so every record of a payload set is unique.

    Starts two days in the past: well inside the service's accepted time window.
    """

    def __init__(self) -> None:
        self._next_us = time.time_ns() // 1000 - 2 * 86_400 * 1_000_000

    def take(self, n: int) -> int:
        """Reserve ``n`` consecutive microseconds; returns the first."""
        first = self._next_us
        self._next_us += n
        return first


def make_payloads(kind: str, per_msg: int, n_msgs: int, first_us: int, seed: int) -> list[bytes]:
    """JSON messages of ``kind`` built with :func:`store_svc.devtools.demo.synthetic_records`.

    Args:
        kind: ``trades`` or ``bars``.
        per_msg: records per message (one record is sent as a bare object).
        n_msgs: how many messages.
        first_us: epoch microsecond of the first record; each next record is 1 µs later.
        seed: random seed.
    """
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    out: list[bytes] = []
    for i in range(n_msgs):
        recs = synthetic_records(kind, per_msg, rng, (first_us + i * per_msg) * 1000)
        out.append(encode(recs[0] if per_msg == 1 else recs))
    return out


class PayloadSet:
    """The payloads of one (records per message, kind), shared by every scenario.

    Each scenario stores into a fresh database, so sharing payloads never makes two
    records of one database collide. The throughput file is written once; the latency
    pool (fresh records, disjoint from the throughput ones) grows as phases need it.

    Args:
        directory: where the files go.
        kind: record kind.
        per_msg: records per message.
        n_msgs: messages of the throughput phase.
        ts: the run's timestamp allocator.
    """

    def __init__(self, directory: Path, kind: str, per_msg: int, n_msgs: int, ts: TsAllocator):
        self.kind = kind
        self.per_msg = per_msg
        self.n_msgs = n_msgs
        self._ts = ts
        self.file = directory / f"throughput-{per_msg}-{kind}.msgpack"
        payloads = make_payloads(kind, per_msg, n_msgs, ts.take(n_msgs * per_msg), seed=1)
        self.payload_bytes = sum(len(p) for p in payloads)
        save_payloads(self.file, payloads)
        self.pool_file = directory / f"latency-{per_msg}-{kind}.msgpack"
        self.pool_size = 0

    @property
    def records(self) -> int:
        """Records of the throughput phase."""
        return self.n_msgs * self.per_msg

    def payloads(self) -> list[bytes]:
        """The throughput payloads (read from the file)."""
        return load_payloads(str(self.file))

    def latency_pool(self, n: int) -> Path:
        """The latency pool file, holding at least ``n`` messages."""
        if self.pool_size < n:
            pool = load_payloads(str(self.pool_file)) if self.pool_size else []
            extra = max(n - self.pool_size, n // 4)
            first = self._ts.take(extra * self.per_msg)
            pool += make_payloads(self.kind, self.per_msg, extra, first, seed=2 + self.pool_size)
            save_payloads(self.pool_file, pool)
            self.pool_size = len(pool)
        return self.pool_file


@dataclass(frozen=True)
class PhasePayloads:
    """The fresh records of one mixed-load ingest phase.

    Attributes:
        label: ``a``, ``b`` or ``c``.
        file: the payload file of the publishers.
        n_msgs: messages.
        first_us: epoch microsecond of the first record (each next one 1 µs later).
        records: records in all.
        symbol_counts: records per symbol.
    """

    label: str
    file: Path
    n_msgs: int
    first_us: int
    records: int
    symbol_counts: dict[str, int]

    @classmethod
    def make(
        cls, directory: Path, label: str, n_msgs: int, ts: TsAllocator, seed: int
    ) -> PhasePayloads:
        """Build and save ``n_msgs`` messages of 100 trades on timestamps of their own."""
        records = n_msgs * MIXED_PER_MSG
        first = ts.take(records)
        payloads = make_payloads(MIXED_KIND, MIXED_PER_MSG, n_msgs, first, seed)
        file = directory / f"mixed-{label}-{MIXED_PER_MSG}-{MIXED_KIND}.msgpack"
        save_payloads(file, payloads)
        decode = msgspec.json.Decoder(list[_Symbol]).decode
        counts = Counter(r.symbol for payload in payloads for r in decode(payload))
        return cls(label, file, n_msgs, first, records, dict(counts))


class _Symbol(msgspec.Struct):
    """A record's symbol (the rest of the record is skipped when decoding)."""

    symbol: str


def rfc3339_us(epoch_us: int) -> str:
    """An epoch microsecond as exact RFC 3339 text (a float of seconds would round)."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=epoch_us)).isoformat()


# ------------------------------------------------------------------- run context


class Progress:
    """The progress bar on stderr (tqdm) and the log lines above it."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total,
            file=sys.stderr,
            disable=not enabled,
            unit="scenario",
            bar_format="{n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining}  {desc}",
        )
        self.scenario = "setup"

    def start(self, scenario: str) -> None:
        """A scenario begins."""
        self.scenario = scenario
        self.phase("starting")

    def phase(self, text: str) -> None:
        """Show the current phase."""
        self.bar.set_description_str(f"{self.scenario}: {text}"[:72])

    def log(self, text: str) -> None:
        """A line on stderr, above the bar."""
        tqdm.write(f"[{self.scenario}] {text}", file=sys.stderr)

    def advance(self) -> None:
        """A scenario ended."""
        self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


@dataclass
class RunContext:
    """What every scenario of a run shares."""

    url: str
    preset: Preset
    publishers: int
    workroot: Path
    lt: LoopThread
    progress: Progress
    pg: PostgresServer | None
    profile_dir: Path | None
    ts: TsAllocator = field(default_factory=TsAllocator)
    payload_sets: dict[tuple[int, str], PayloadSet] = field(default_factory=dict)
    ceilings_a: dict[str, dict[str, Any]] = field(default_factory=dict)
    ceilings_b: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    mixed_phases: list[PhasePayloads] = field(default_factory=list)
    #: Process trees whose CPU the mixed-load scenarios meter (nats-server, PostgreSQL).
    cpu_roots: dict[str, int] = field(default_factory=dict)

    def mixed_payloads(self) -> list[PhasePayloads]:
        """The three ingest phases of the mixed-load scenarios (records disjoint in
        time; shared by both sinks, each of which stores into a fresh database), built
        on first use."""
        if not self.mixed_phases:
            n = self.preset.mixed_messages
            self.progress.phase(f"generating 3 x {n:,} messages x {MIXED_PER_MSG} {MIXED_KIND}")
            t0 = time.monotonic()
            self.mixed_phases = [
                PhasePayloads.make(self.workroot, label, n, self.ts, seed=10 + i)
                for i, label in enumerate("abc")
            ]
            self.progress.log(
                f"mixed-load payloads: 3 x {n:,} messages in {time.monotonic() - t0:.1f}s"
            )
        return self.mixed_phases

    def payload_set(self, per_msg: int, kind: str) -> PayloadSet:
        """The payloads of (records per message, kind), built on first use."""
        key = (per_msg, kind)
        if key not in self.payload_sets:
            n = self.preset.messages[per_msg]
            self.progress.phase(f"generating {n:,} messages x {per_msg} {kind}")
            t0 = time.monotonic()
            self.payload_sets[key] = PayloadSet(self.workroot, kind, per_msg, n, self.ts)
            self.progress.log(
                f"payloads {per_msg}-{kind}: {n:,} messages in {time.monotonic() - t0:.1f}s"
            )
        return self.payload_sets[key]

    def ceiling_a(self, per_msg: int, kind: str) -> tuple[str, dict[str, Any]]:
        """Ceiling A of (records per message, kind), measured on first use."""
        key = f"{per_msg}-{kind}"
        if key not in self.ceilings_a:
            pset = self.payload_set(per_msg, kind)
            self.progress.phase(f"ceiling A (bare subscriber) {key}")
            delete_stream(self.url, DEFAULTS.js_stream)
            settings = service_settings(self.url, "sqlite:///unused.db")
            a = measure_bare_subscriber(
                self.url,
                settings,
                kind,
                pset.file,
                pset.n_msgs,
                per_msg,
                self.preset.flow(CORE, per_msg),
                self.publishers,
            )
            self.ceilings_a[key] = a
            self.progress.log(f"ceiling A {key}: {a['records_per_s']:,.0f} records/s")
        return key, self.ceilings_a[key]

    def ceiling_b(self, sink: str, per_msg: int, kind: str) -> tuple[str, dict[str, Any]]:
        """Ceiling B of (sink, records per message, kind), measured on first use."""
        key = f"{sink}-{per_msg}-{kind}"
        if key not in self.ceilings_b:
            pset = self.payload_set(per_msg, kind)
            self.progress.phase(f"ceiling B (raw {sink} insert) {key}")
            if sink == POSTGRESQL:
                assert self.pg is not None
                url = create_pg_database(self.pg, f"raw-{key}")
                try:
                    b = measure_raw_copy_merge(kind, pset.payloads(), url, DEFAULTS)
                finally:
                    drop_pg_database(self.pg, url)
            else:
                directory = Path(tempfile.mkdtemp(prefix="raw-", dir=self.workroot))
                try:
                    b = measure_raw_executemany(
                        kind, pset.payloads(), directory / "raw.db", DEFAULTS
                    )
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
            self.ceilings_b[key] = b
            self.progress.log(f"ceiling B {key}: {b['rows_per_s']:,.0f} rows/s ({b['method']})")
        return key, self.ceilings_b[key]


# ------------------------------------------------------------------- measurements


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def measure_latency(
    url: str,
    settings: Settings,
    subject: str,
    pool_file: Path,
    start: int,
    stop: int,
    rate: float,
    js_window: int,
) -> dict[str, Any]:
    """Run one paced phase (``pool[start:stop]`` at ``rate`` msgs/s) and summarise it.

    Returns:
        Rate asked and achieved, replies, refused messages and latency percentiles in ms.
    """
    common = (url, subject, str(pool_file), rate)
    timing: dict[str, Any] = {"timeout": 60.0, "start": start, "stop": stop}
    if settings.ingest_mode == JETSTREAM:
        every = 1
        ack_subject = f"$JS.ACK.{settings.js_stream}.{settings.js_durable}.>"
        spec = PacedSpec(
            *common, mode=JETSTREAM, ack_subject=ack_subject, window=js_window, **timing
        )
        measured_by = f"ack seen on {ack_subject} minus send time, every message"
    else:
        # About a thousand sampled requests a second, whatever the message rate.
        every = max(1, int(rate // 1000))
        spec = PacedSpec(*common, sample_every=every, **timing)
        measured_by = "reply to a request minus send time, sampled"
    proc = spawn("--paced", spec)
    try:
        await_ready(proc)
        send_line(proc, _GO)
        res = collect(proc, PacedResult, timeout=600.0)
    finally:
        reap([proc])
    lat = sorted(res.latencies_ms)
    return {
        "measured_by": measured_by,
        "rate_msgs_per_s": rate,
        "sampled_every": every,
        "achieved_msgs_per_s": res.achieved_rate,
        "sent_msgs": res.sent,
        "waited_for": res.messages,
        "replies": res.replies,
        "error_replies": res.error_replies,
        "timed_out": res.timed_out,
        "samples": len(lat),
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else None,
        "mean_ms": sum(lat) / len(lat) if lat else None,
    }


def _require_pg(ctx: RunContext, sink: str) -> None:
    if sink == POSTGRESQL and ctx.pg is None:
        raise RuntimeError("no PostgreSQL server (see the log above)")


def run_service_scenario(ctx: RunContext, sc: Scenario) -> dict[str, Any]:
    """One matrix or scale-out scenario: ceilings (shared), throughput with feedback and
    RSS, the row-count check, and latency at 50 % and 90 % of the maximum.

    Returns:
        The scenario's section of the JSON report (``failures`` lists what must make
        the run fail).
    """
    p = ctx.progress
    _require_pg(ctx, sc.sink)
    pset = ctx.payload_set(sc.per_msg, sc.kind)
    a_key, a = ctx.ceiling_a(sc.per_msg, sc.kind)
    b_key, b = ctx.ceiling_b(sc.sink, sc.per_msg, sc.kind)
    on_js = sc.mode == JETSTREAM
    workdir = ctx.workroot / sc.name
    workdir.mkdir()
    if sc.sink == POSTGRESQL:
        assert ctx.pg is not None
        database_url = create_pg_database(ctx.pg, sc.name)
    else:
        database_url = f"sqlite:///{(workdir / 'service.db').resolve()}"
    settings = service_settings(ctx.url, database_url, sc.mode)
    subject = settings.subject("store", "write", sc.kind)
    flow = ctx.preset.flow(sc.mode, sc.per_msg)
    out: dict[str, Any] = {
        "name": sc.name,
        "group": "scaleout" if sc.instances > 1 else "matrix",
        "mode": sc.mode,
        "sink": sc.sink,
        "records_per_msg": sc.per_msg,
        "kind": sc.kind,
        "instances": sc.instances,
        "messages": pset.n_msgs,
        "payload_bytes": pset.payload_bytes,
        "flow_control": {"pub_ack_window_msgs": flow.window}
        if on_js
        else {"chunk_msgs": flow.chunk, "window_requests": flow.window},
        "publishers": ctx.publishers,
        "ceilings": {
            "A_key": a_key,
            "A_records_per_s": a["records_per_s"],
            "B_key": b_key,
            "B_rows_per_s": b["rows_per_s"],
            "B_method": b["method"],
        },
    }
    failures: list[str] = []
    delete_stream(ctx.url, settings.js_stream)
    services = [ServiceProcess(settings, workdir / f"service-{i}.log") for i in range(sc.instances)]
    sampler: RssSampler | None = None
    svc: dict[str, Any] = {}
    try:
        for i, service in enumerate(services):
            p.phase(f"starting service {i + 1}/{sc.instances}")
            service.start()
            if on_js:
                asyncio.run(probe_jetstream(ctx.url, settings, timeout=30.0))
            else:
                asyncio.run(probe_core(ctx.url, subject, timeout=30.0))
        sampler = RssSampler([s.pid for s in services], ctx.preset.rss_interval).start()
        idle_mb = sampler.peak_mb()

        # Throughput, with the feedback events counted.
        p.phase(f"throughput ({pset.n_msgs:,} msgs x {sc.per_msg})")
        feedback = FeedbackCounter(ctx.lt, ctx.url, settings.subject("telemetry", "feedback"))
        feedback.start()
        watch = (
            ctx.lt.submit(
                wait_stream_drained(ctx.url, settings.js_stream, pset.n_msgs, stall_timeout=60.0)
            )
            if on_js
            else None
        )
        spy = None
        if ctx.profile_dir is not None:
            profile = ctx.profile_dir / f"service-{sc.name}.speedscope.json"
            spy = start_py_spy(services[0].pid, profile)
            time.sleep(1.0)  # let py-spy attach before the load starts
        try:
            results = run_publishers(
                ctx.url, subject, pset.file, pset.n_msgs, sc.mode, flow, ctx.publishers
            )
            drained = watch.result(timeout=900.0) if watch is not None else None
        finally:
            stop_py_spy(spy)
            fb = feedback.stop()
            if watch is not None and not watch.done():
                watch.cancel()
        t_end_phase = time.monotonic()
        for service in services:
            service.check_alive()
        tp = summarize(results, sc.per_msg)
        refused = tp.error_replies * sc.per_msg
        # The last reply (core) or the drained stream (JetStream) means every record is
        # committed, unless a message was refused or a wait timed out: then the count
        # is awaited until it stops growing.
        stored = wait_rows(database_url, sc.kind, tp.published_records - refused)
        svc = tp.as_dict()
        if on_js:
            assert drained is not None
            committed_at, stream_state = drained
            end = committed_at if committed_at is not None else t_end_phase
            del svc["flow_control_requests"], svc["flow_control_replies"]
            svc.update(
                {
                    "duration_s": round(end - tp.start, 4),
                    "end": "stream drained: every message acked after commit"
                    if committed_at is not None
                    else f"stalled (no stream change for 60 s): {stream_state}",
                    "pub_acks": tp.replies,
                    "pub_ack_errors": tp.error_replies,
                    "stream_ingest_s": round(tp.duration_s, 4),
                    "stream_ingest_rows_per_s": tp.published_records / tp.duration_s,
                }
            )
            duration = end - tp.start
        else:
            svc["accepted_in_flow_control_replies"] = sum(r.accepted for r in results)
            duration = tp.duration_s
        lost = tp.published_records - stored - refused
        svc.update(
            {
                "stored": stored,
                "refused_records": refused,
                "lost": lost,
                "rows_per_s": stored / duration,
                "msgs_per_s": stored / sc.per_msg / duration,
                "feedback": fb,
                "rss_mb_idle": idle_mb,
                "peak_rss_mb_throughput": sampler.peak_mb(until=t_end_phase),
            }
        )
        p.log(
            f"{svc['rows_per_s']:,.0f} rows/s ({svc['rows_per_s'] / a['records_per_s']:.2f} A, "
            f"{svc['rows_per_s'] / b['rows_per_s']:.2f} B), lost {lost}, "
            f"feedback ok/soft/hard {fb['ok']}/{fb['soft']}/{fb['hard']}"
        )

        # Latency at 50 % and 90 % of the maximum, on fresh records.
        rates = [max(1.0, svc["msgs_per_s"] * f) for f in LATENCY_FRACTIONS]
        counts = [max(20, int(r * ctx.preset.latency_seconds)) for r in rates]
        pool = pset.latency_pool(sum(counts))
        phases: list[dict[str, Any]] = []
        first = 0
        for fraction, rate, n in zip(LATENCY_FRACTIONS, rates, counts, strict=True):
            p.phase(f"latency at {fraction:.0%} ({rate:,.0f} msgs/s)")
            before = count_stored(database_url, sc.kind)
            phase = measure_latency(
                ctx.url,
                settings,
                subject,
                pool,
                first,
                first + n,
                rate,
                ctx.preset.js_window[sc.per_msg],
            )
            first += n
            refused_lat = phase["error_replies"] * sc.per_msg
            # A refused last request ends the paced run before the rest is committed.
            after = wait_rows(database_url, sc.kind, before + n * sc.per_msg - refused_lat)
            phase.update(
                {
                    "fraction_of_max": fraction,
                    "achieved_rows_per_s": phase["achieved_msgs_per_s"] * sc.per_msg,
                    "records": n * sc.per_msg,
                    "stored": after - before,
                    "refused_records": refused_lat,
                    "lost": n * sc.per_msg - (after - before) - refused_lat,
                }
            )
            phases.append(phase)
            for service in services:
                service.check_alive()
            p.log(
                f"latency at {fraction:.0%}: p50 {_f(phase['p50_ms'])} / p99 "
                f"{_f(phase['p99_ms'])} ms at {phase['achieved_rows_per_s']:,.0f} rows/s, "
                f"lost {phase['lost']}"
            )
        out["latency"] = phases
        svc["lost_total"] = lost + sum(ph["lost"] for ph in phases)
        svc["refused_total"] = refused + sum(ph["refused_records"] for ph in phases)
    finally:
        p.phase("stopping")
        shutdowns = [s.stop() for s in services]
        if sampler is not None:
            sampler.stop()
            svc["peak_rss_mb"] = sampler.peak_mb()
            svc["peak_rss_mb_per_instance"] = sampler.peak_per_root_mb()
        svc["service_shutdown"] = shutdowns
        out["service"] = svc
        if on_js:
            out["jetstream"] = jetstream_state(ctx.url, settings)
            delete_stream(ctx.url, settings.js_stream)
        if ctx.pg is not None and sc.sink == POSTGRESQL:
            drop_pg_database(ctx.pg, database_url)
    for i, sd in enumerate(shutdowns):
        if sd["crashed"]:
            failures.append(f"{sc.name}: service {i + 1} crashed (exit code {sd['exit_code']})")
    if svc.get("lost_total"):
        failures.append(f"{sc.name}: {svc['lost_total']:,} records lost")
    out["ratios"] = {
        "service_vs_bare_subscriber": svc["rows_per_s"] / a["records_per_s"],
        "service_vs_raw_sink": svc["rows_per_s"] / b["rows_per_s"],
    }
    if "convert_plus_executemany_rows_per_s" in b:
        out["ratios"]["service_vs_raw_convert_plus_executemany"] = (
            svc["rows_per_s"] / b["convert_plus_executemany_rows_per_s"]
        )
    if "sequential_rows_per_s" in b:
        out["ratios"]["service_vs_raw_copy_merge_one_connection"] = (
            svc["rows_per_s"] / b["sequential_rows_per_s"]
        )
    if sc.instances > 1:
        twin = ctx.results.get(sc.base_name)
        out["single_instance_scenario"] = sc.base_name
        twin_rate = _deep(twin, "service", "rows_per_s")
        out["single_instance_rows_per_s"] = twin_rate
        out["ratios"]["service_vs_single_instance"] = (
            svc["rows_per_s"] / twin_rate if twin_rate else None
        )
    out["failures"] = failures
    return out


def run_mixed_scenario(ctx: RunContext, sc: MixedScenario) -> dict[str, Any]:
    """``mixed-query-<sink>``: ingest throughput with and without a concurrent query load.

    One service (core, default settings) on a fresh database; three ingest phases of
    fresh 100-record trade messages with the matrix's publishers and flow control:
    (a) alone, (b) with the paced query load, (c) alone again; the ratio is b over
    the mean of a and c. Then the query client runs closed-loop with no ingest for
    the preset's seconds (the read path's maximum).

    Returns:
        The scenario's section of the JSON report (``failures`` lists what must make
        the run fail).
    """
    p = ctx.progress
    _require_pg(ctx, sc.sink)
    phases = ctx.mixed_payloads()
    workdir = ctx.workroot / sc.name
    workdir.mkdir()
    if sc.sink == POSTGRESQL:
        assert ctx.pg is not None
        database_url = create_pg_database(ctx.pg, sc.name)
    else:
        database_url = f"sqlite:///{(workdir / 'service.db').resolve()}"
    settings = service_settings(ctx.url, database_url)
    subject = settings.subject("store", "write", MIXED_KIND)
    flow = ctx.preset.flow(CORE, MIXED_PER_MSG)
    first = phases[0]
    load_spec = QueryLoadSpec(
        ctx.url,
        settings.subject("store", "query", MIXED_KIND),
        settings.subject("store", "latest", MIXED_KIND),
        page_chains=[list(c) for c in QUERY_CHAINS],
        start=rfc3339_us(first.first_us),
        end=rfc3339_us(first.first_us + first.records),
        latest_symbols=list(LATEST_SYMBOLS),
        query_rate=ctx.preset.query_rate,
        latest_rate=ctx.preset.latest_rate,
        limit=QUERY_PAGE_LIMIT,
        latest_workers=LATEST_WORKERS,
        in_flight=QUERY_IN_FLIGHT,
    )
    alone_spec = msgspec.structs.replace(load_spec, query_rate=CLOSED_LOOP, latest_rate=0.0)
    out: dict[str, Any] = {
        "name": sc.name,
        "group": "mixed",
        "mode": CORE,
        "sink": sc.sink,
        "records_per_msg": MIXED_PER_MSG,
        "kind": MIXED_KIND,
        "messages_per_phase": first.n_msgs,
        "flow_control": {"chunk_msgs": flow.chunk, "window_requests": flow.window},
        "publishers": ctx.publishers,
        "query_range": {
            "start": load_spec.start,
            "end": load_spec.end,
            "records": first.records,
            "records_per_symbol": first.symbol_counts,
        },
    }
    failures: list[str] = []
    notes: list[str] = []
    delete_stream(ctx.url, settings.js_stream)
    service = ServiceProcess(settings, workdir / "service.log")
    sampler: RssSampler | None = None
    svc: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        p.phase("starting the service")
        service.start()
        asyncio.run(probe_core(ctx.url, subject, timeout=30.0))
        sampler = RssSampler([service.pid], ctx.preset.rss_interval).start()
        svc["rss_mb_idle"] = sampler.peak_mb()
        meter = CpuMeter({"service": service.pid, **ctx.cpu_roots})
        for phase, key in zip(phases, ("a_alone", "b_with_queries", "c_alone"), strict=True):
            with_load = phase.label == "b"
            p.phase(
                f"{phase.label}: {phase.n_msgs:,} msgs x {MIXED_PER_MSG}"
                + (" + query load" if with_load else "")
            )
            tp, load = _mixed_ingest(
                ctx,
                database_url,
                subject,
                phase,
                flow,
                sampler,
                meter,
                load_spec if with_load else None,
            )
            service.check_alive()
            results[key] = tp
            if load is not None:
                out["query_load"] = summarize_query_load(load, load_spec, first)
                tp["cpu"]["query_client_cpu_s"] = round(load.cpu_seconds, 3)
            p.log(
                f"{phase.label}: {tp['rows_per_s']:,.0f} rows/s, lost {tp['lost']}"
                + (f"; {_query_line(out['query_load'])}" if load is not None else "")
            )
        p.phase(f"queries alone, closed loop ({ctx.preset.queries_alone_seconds:g} s)")
        seconds = ctx.preset.queries_alone_seconds
        cpu0, t0 = meter.read(), time.monotonic()
        _, alone = _with_query_load(alone_spec, lambda: time.sleep(seconds))
        wall = time.monotonic() - t0
        cpu = CpuMeter.used(cpu0, meter.read(), wall)
        cpu["query_client_cpu_s"] = round(alone.cpu_seconds, 3)
        service.check_alive()
        out["queries_alone"] = summarize_query_load(alone, alone_spec, first)
        out["queries_alone"].update({"wall_s": round(wall, 3), "cpu": cpu})
        p.log(f"queries alone: {_query_line(out['queries_alone'])}")
    finally:
        p.phase("stopping")
        shutdown = service.stop()
        if sampler is not None:
            sampler.stop()
            svc["peak_rss_mb"] = sampler.peak_mb()
        svc["service_shutdown"] = shutdown
        out["phases"] = results
        if ctx.pg is not None and sc.sink == POSTGRESQL:
            drop_pg_database(ctx.pg, database_url)
    rates = {k: v["rows_per_s"] for k, v in results.items()}
    out["rows_per_s"] = rates
    alone_mean = (rates["a_alone"] + rates["c_alone"]) / 2
    out["ratios"] = {
        "with_queries_vs_alone": rates["b_with_queries"] / alone_mean if alone_mean else None,
        "c_vs_a": rates["c_alone"] / rates["a_alone"] if rates["a_alone"] else None,
    }
    svc["lost_total"] = sum(v["lost"] for v in results.values())
    svc["refused_total"] = sum(v["refused_records"] for v in results.values())
    out["service"] = svc
    if shutdown["crashed"]:
        failures.append(f"{sc.name}: service crashed (exit code {shutdown['exit_code']})")
    if svc["lost_total"]:
        failures.append(f"{sc.name}: {svc['lost_total']:,} records lost")
    for what in ("query_load", "queries_alone"):
        notes.extend(f"{what}: {n}" for n in out[what].pop("problems"))
    if notes:
        out["notes"] = notes
    p.log(
        f"ratio {out['ratios']['with_queries_vs_alone']:.2f} "
        f"(b {rates['b_with_queries']:,.0f} / mean of a {rates['a_alone']:,.0f} "
        f"and c {rates['c_alone']:,.0f} rows/s)"
    )
    out["failures"] = failures
    return out


def _mixed_ingest(
    ctx: RunContext,
    database_url: str,
    subject: str,
    phase: PhasePayloads,
    flow: FlowControl,
    sampler: RssSampler,
    meter: CpuMeter,
    load_spec: QueryLoadSpec | None,
) -> tuple[dict[str, Any], QueryLoadResult | None]:
    """One ingest phase of a mixed-load scenario, with the query load when a spec is
    given (started just before the publishers, stopped after the last reply).

    Returns:
        The phase's throughput, row count check, feedback, RSS and CPU seconds per
        process tree; the load's result.
    """
    settings = service_settings(ctx.url, database_url)
    before = count_stored(database_url, MIXED_KIND)
    feedback = FeedbackCounter(ctx.lt, ctx.url, settings.subject("telemetry", "feedback"))
    feedback.start()
    cpu0, t0 = meter.read(), time.monotonic()

    def publish() -> list[PublishResult]:
        return run_publishers(
            ctx.url, subject, phase.file, phase.n_msgs, CORE, flow, ctx.publishers
        )

    load: QueryLoadResult | None = None
    try:
        if load_spec is None:
            results = publish()
        else:
            results, load = _with_query_load(load_spec, publish)
    finally:
        fb = feedback.stop()
    t_end = time.monotonic()
    cpu = CpuMeter.used(cpu0, meter.read(), t_end - t0)
    tp = summarize(results, MIXED_PER_MSG)
    refused = tp.error_replies * MIXED_PER_MSG
    after = wait_rows(database_url, MIXED_KIND, before + tp.published_records - refused)
    stored = after - before
    out = tp.as_dict()
    out.update(
        {
            "first_record_us": phase.first_us,
            "stored": stored,
            "refused_records": refused,
            "lost": tp.published_records - stored - refused,
            "rows_per_s": stored / tp.duration_s,
            "msgs_per_s": stored / MIXED_PER_MSG / tp.duration_s,
            "feedback": fb,
            "peak_rss_mb": sampler.peak_mb(since=t0, until=t_end),
            "wall_s": round(t_end - t0, 3),
            "cpu": cpu,
        }
    )
    return out, load


def _with_query_load(spec: QueryLoadSpec, body: Callable[[], _T]) -> tuple[_T, QueryLoadResult]:
    """Run ``body`` while the query client runs (``GO`` before, ``STOP`` after)."""
    proc = spawn("--query-load", spec)
    try:
        await_ready(proc)
        send_line(proc, _GO)
        value = body()
        send_line(proc, _STOP)
        res = collect(proc, QueryLoadResult, timeout=120.0)
    finally:
        reap([proc])
    return value, res


def summarize_query_load(
    res: QueryLoadResult, spec: QueryLoadSpec, data: PhasePayloads
) -> dict[str, Any]:
    """Per endpoint: requests, rates, records, errors by code and latency percentiles;
    per page worker: its passes, checked against the records the range holds.

    Args:
        res: the query client's result.
        spec: what it was asked to do.
        data: the phase whose records the range covers (phase a).

    Returns:
        The report's section; ``problems`` lists wrong passes, wrong latest replies
        and error replies (each becomes a note).
    """
    seconds = res.seconds
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "max_in_flight": spec.in_flight,
        "page_limit": spec.limit,
    }
    problems: list[str] = []
    present = [s for s in spec.latest_symbols if data.symbol_counts.get(s)]
    for endpoint, rate in (("query", spec.query_rate), ("latest", spec.latest_rate)):
        workers = [w for w in res.workers if w.endpoint == endpoint]
        if not workers:
            continue
        lat = sorted(x for w in workers for x in w.latencies_ms)
        errors: Counter[str] = Counter()
        for w in workers:
            errors.update(w.errors)
        requests = sum(w.requests for w in workers)
        ok = sum(w.ok for w in workers)
        records = sum(w.records for w in workers)
        section: dict[str, Any] = {
            "workers": len(workers),
            "rate_asked_per_s": "closed loop" if rate < 0 else rate,
            "requests": requests,
            "ok": ok,
            "errors": dict(errors),
            "requests_per_s": requests / seconds if seconds > 0 else None,
            "ok_per_s": ok / seconds if seconds > 0 else None,
            "records": records,
            "records_per_s": records / seconds if seconds > 0 else None,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "max_ms": lat[-1] if lat else None,
            "mean_ms": sum(lat) / len(lat) if lat else None,
        }
        if errors:
            problems.append(f"{endpoint} error replies {dict(errors)}")
        if endpoint == "query":
            chains = []
            for w in workers:
                expected = sum(data.symbol_counts.get(s, 0) for s in w.symbols)
                wl = sorted(w.latencies_ms)
                wrong = [n for n in w.passes if n != expected]
                if wrong:
                    problems.append(
                        f"{','.join(w.symbols)}: passes of {wrong} records, expected {expected}"
                    )
                chains.append(
                    {
                        "symbols": w.symbols,
                        "records_in_range": expected,
                        "pages_per_pass": math.ceil(expected / spec.limit),
                        "requests": w.requests,
                        "records": w.records,
                        "passes_complete": len(w.passes),
                        "passes_wrong": len(wrong),
                        "p50_ms": percentile(wl, 50),
                        "p99_ms": percentile(wl, 99),
                    }
                )
            section["chains"] = chains
        else:
            section["symbols"] = list(spec.latest_symbols)
            section["symbols_with_records"] = len(present)
            if ok and records != ok * len(present):
                problems.append(
                    f"latest: {records} records in {ok} replies, expected {len(present)} each"
                )
        out[endpoint] = section
    out["problems"] = problems
    return out


def _query_line(q: dict[str, Any]) -> str:
    """A log line on a query load's result."""
    parts = []
    for endpoint, unit in (("query", "pages"), ("latest", "latest")):
        e = q.get(endpoint)
        if e is not None:
            parts.append(
                f"{e['ok_per_s']:,.1f} {unit}/s (p50 {_f(e['p50_ms'])} / p99 "
                f"{_f(e['p99_ms'])} ms, {e['records_per_s']:,.0f} rec/s, "
                f"errors {sum(e['errors'].values())})"
            )
    return "; ".join(parts)


def run_rss_full_queue(ctx: RunContext) -> dict[str, Any]:
    """``rss-full-queue``: the service tree's RSS with a full queue and stalled commits.

    The service (default settings, core, SQLite) starts; the harness takes the
    SQLite file's write lock (``BEGIN EXCLUSIVE``) so every commit waits (and fails
    after the writer's busy timeout, and is retried). 1000-record trade messages are
    published one at a time, each followed by health requests until the service has
    taken it (queue depth + batch in flight), until the feedback subject has said
    ``hard`` and the next message would not fit in the queue. The RSS of the tree is
    read (and sampled throughout); then the lock is released and every published
    record must get stored.
    """
    p = ctx.progress
    per_msg = 1000
    capacity = DEFAULTS.queue_capacity
    workdir = ctx.workroot / RSS_FULL_QUEUE
    workdir.mkdir()
    db_path = (workdir / "service.db").resolve()
    database_url = f"sqlite:///{db_path}"
    settings = service_settings(ctx.url, database_url)
    subject = settings.subject("store", "write", "trades")
    n_max = capacity // per_msg + 20
    p.phase(f"generating {n_max} messages x {per_msg} trades")
    payloads = make_payloads("trades", per_msg, n_max, ctx.ts.take(n_max * per_msg), seed=3)
    delete_stream(ctx.url, settings.js_stream)
    service = ServiceProcess(settings, workdir / "service.log")
    out: dict[str, Any] = {
        "name": RSS_FULL_QUEUE,
        "group": "rss",
        "mode": CORE,
        "sink": SQLITE,
        "records_per_msg": per_msg,
        "kind": "trades",
    }
    failures: list[str] = []
    sampler: RssSampler | None = None
    lock: sqlite3.Connection | None = None
    t_release: float | None = None
    result: dict[str, Any] = {"records_per_msg": per_msg, "capacity": capacity}
    try:
        p.phase("starting the service")
        service.start()
        asyncio.run(probe_core(ctx.url, subject, timeout=30.0))
        sampler = RssSampler([service.pid], ctx.preset.rss_interval).start()
        time.sleep(0.3)
        result["rss_mb_idle"] = sampler.sample() / 1e6
        lock = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
        lock.execute("BEGIN EXCLUSIVE")
        p.phase("filling the queue (commits blocked)")
        feedback = FeedbackCounter(ctx.lt, ctx.url, settings.subject("telemetry", "feedback"))
        feedback.start()
        try:
            fill = asyncio.run(_fill_queue(ctx.url, settings, subject, payloads, feedback))
        finally:
            fb = feedback.stop()
        service.check_alive()
        t_full = time.monotonic()
        time.sleep(1.0)  # let the allocator settle; the sampler keeps sampling
        result.update(fill)
        result["rss_mb_full"] = sampler.sample() / 1e6
        result["peak_rss_mb_full"] = sampler.peak_mb()
        result["feedback"] = fb
        p.log(
            f"queue {fill['queue_depth_full']:,}/{capacity:,} + {fill['in_flight_full']:,} in "
            f"flight, level {fill['level_full']}: RSS {result['rss_mb_full']:.0f} MB "
            f"(peak {result['peak_rss_mb_full']:.0f} MB)"
        )
        p.phase("releasing the lock, storing")
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        t_release = time.monotonic()
        published = fill["published_records"]
        stored = wait_rows(database_url, "trades", published, stall_timeout=30.0)
        result["store_after_release_s"] = time.monotonic() - t_release
        service.check_alive()
        result["stored"] = stored
        result["lost"] = published - stored
        result["seconds_full_before_release"] = t_release - t_full
    finally:
        if lock is not None:
            lock.close()
        p.phase("stopping")
        shutdown = service.stop()
        if sampler is not None:
            sampler.stop()
            if t_release is not None:
                result["peak_rss_mb_after_release"] = sampler.peak_mb(since=t_release)
        result["service_shutdown"] = shutdown
        out["rss_full_queue"] = result
    if shutdown["crashed"]:
        failures.append(f"{RSS_FULL_QUEUE}: service crashed (exit code {shutdown['exit_code']})")
    if result.get("lost"):
        failures.append(f"{RSS_FULL_QUEUE}: {result['lost']:,} records lost")
    if not result.get("hard_seen"):
        out["notes"] = ["feedback never reported hard while the queue filled"]
    out["failures"] = failures
    return out


async def _fill_queue(
    url: str,
    settings: Settings,
    subject: str,
    payloads: list[bytes],
    feedback: FeedbackCounter,
) -> dict[str, Any]:
    """Publish until ``hard`` was reported and the queue has no room for another message.

    Returns:
        What was published and the queue's state (from the health endpoint) then.
    """
    nc: NATS = await nats.connect(url, name="bench-fill")
    health_subject = settings.subject("store", "health")
    per_msg = len(json.loads(payloads[0]))
    published = 0
    at_hard: int | None = None
    queue: dict[str, Any] = {}

    async def queue_state() -> dict[str, Any]:
        reply = await nc.request(health_subject, b"", timeout=5.0)
        comps = {c["name"]: c for c in json.loads(reply.data)["components"]}
        d = comps["queue"]["details"]
        return {
            "depth": int(d["depth"]),
            "capacity": int(d["capacity"]),
            "in_flight": int(d["in_flight"]),
            "level": d["level"],
        }

    try:
        for payload in payloads:
            await nc.publish(subject, payload)
            await nc.flush()
            published += per_msg
            # Wait until the service has taken the message (or stays blocked).
            deadline = time.monotonic() + 2.0
            while True:
                queue = await queue_state()
                if queue["depth"] + queue["in_flight"] >= published:
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.01)
            if at_hard is None and (feedback.first_hard_at is not None or queue["level"] == "hard"):
                at_hard = published
            if at_hard is not None and queue["depth"] + per_msg > queue["capacity"]:
                break
        await asyncio.sleep(0.3)  # the last feedback events
        queue = await queue_state()
    finally:
        await nc.close()
    return {
        "published_msgs": published // per_msg,
        "published_records": published,
        "published_records_at_hard": at_hard,
        "hard_seen": feedback.first_hard_at is not None,
        "queue_depth_full": queue.get("depth"),
        "in_flight_full": queue.get("in_flight"),
        "level_full": queue.get("level"),
        "taken_by_service": queue.get("depth", 0) + queue.get("in_flight", 0),
    }


# ---------------------------------------------------------------- small helpers


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _deep(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# ------------------------------------------------------------------- orchestration


def select(patterns: Sequence[str] | None) -> list[str]:
    """Scenario names matching ``patterns`` (all when none), in run order.

    A scale-out scenario brings its single-instance twin along.

    Raises:
        SystemExit: a pattern matches nothing.
    """
    if not patterns:
        return list(ALL_NAMES)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in ALL_NAMES if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SystemExit(f"--only {pattern!r} matches no scenario (see --list)")
        chosen.update(hits)
    for name in list(chosen):
        if name.startswith(SCALEOUT_PREFIX):
            chosen.add(name.removeprefix(SCALEOUT_PREFIX))
    return [n for n in ALL_NAMES if n in chosen]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected scenarios on one private nats-server and build the report."""
    preset = QUICK if args.quick else FULL
    names = select(args.only)
    by_name = {s.name: s for s in (*MATRIX, *SCALEOUT)}
    mixed_by_name = {s.name: s for s in MIXED}
    sink_of = {s.name: s.sink for s in (*MATRIX, *SCALEOUT)}
    sink_of.update((s.name, s.sink) for s in MIXED)
    info = machine_info()
    started = time.monotonic()
    scenarios: list[dict[str, Any]] = []
    failures: list[str] = []
    enabled = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = Progress(len(names), enabled)
    profile_dir = args.output_dir if args.py_spy else None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.callback(progress.close)
        workroot = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        if args.keep:
            stack.callback(print, f"kept {workroot}", file=sys.stderr)
        else:
            stack.callback(shutil.rmtree, workroot, ignore_errors=True)
        progress.phase("starting nats-server")
        server = stack.enter_context(NatsServer(store_dir=workroot / "jetstream"))
        progress.log(f"nats-server on {server.url} (JetStream store in {workroot})")
        pg: PostgresServer | None = None
        if any(sink_of.get(n) == POSTGRESQL for n in names):
            progress.phase("starting PostgreSQL")
            try:
                pg = PostgresServer()
                stack.callback(pg.remove)  # also after a failed start: the folder goes
                pg.start()
                progress.log(f"PostgreSQL on {pg.dsn}")
                info["postgresql"] = pg_version()
            except (OSError, subprocess.SubprocessError) as exc:
                # The PostgreSQL scenarios fail (exit code 1); the others still run.
                progress.log(f"PostgreSQL could not start: {exc!r}")
                pg = None
        lt = LoopThread()
        stack.callback(lt.close)
        ctx = RunContext(
            server.url, preset, args.publishers, workroot, lt, progress, pg, profile_dir
        )
        if server.proc is not None:
            ctx.cpu_roots["nats_server"] = server.proc.pid
        if pg is not None and (pm := postmaster_pid(pg.data)) is not None:
            ctx.cpu_roots["postgresql"] = pm
        for name in names:
            progress.start(name)
            t0 = time.monotonic()
            try:
                if name == RSS_FULL_QUEUE:
                    result = run_rss_full_queue(ctx)
                elif name in mixed_by_name:
                    result = run_mixed_scenario(ctx, mixed_by_name[name])
                else:
                    result = run_service_scenario(ctx, by_name[name])
            except Exception as exc:
                progress.log(f"FAILED: {exc!r}")
                result = {
                    "name": name,
                    "group": "error",
                    "error": repr(exc),
                    "traceback": traceback.format_exc(),
                    "failures": [f"{name}: could not run: {exc!r}"],
                }
            result["wall_s"] = round(time.monotonic() - t0, 1)
            failures.extend(result["failures"])
            scenarios.append(result)
            ctx.results[name] = result
            progress.advance()
    info["loadavg_at_end"] = os.getloadavg()
    info["git_at_end"] = git_state()
    defaults = DEFAULTS.model_dump(exclude={"admin_token", "nats_url", "database_url"})
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "preset": preset.name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.monotonic() - started, 1),
        "command": sys.argv,
        "machine": info,
        "service_settings": defaults,
        "preset_sizes": {
            "messages": preset.messages,
            "latency_seconds": preset.latency_seconds,
            "latency_fractions": LATENCY_FRACTIONS,
            "rss_sample_interval_s": preset.rss_interval,
            "mixed": {
                "messages_per_phase": preset.mixed_messages,
                "records_per_msg": MIXED_PER_MSG,
                "query_rate_per_s": preset.query_rate,
                "latest_rate_per_s": preset.latest_rate,
                "queries_alone_seconds": preset.queries_alone_seconds,
                "page_chains": QUERY_CHAINS,
                "latest_symbols": LATEST_SYMBOLS,
                "latest_workers": LATEST_WORKERS,
                "page_limit": QUERY_PAGE_LIMIT,
                "max_in_flight": QUERY_IN_FLIGHT,
            },
        },
        "publishers": args.publishers,
        "ceilings": {"bare_subscriber": ctx.ceilings_a, "raw_sink": ctx.ceilings_b},
        "scenarios": scenarios,
        "failures": failures,
    }
    report["targets"] = targets(report)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Benchmark store-svc ingest: mode x sink x records/msg x kind, against a "
        "bare NATS subscriber and a raw sink insert measured in the same run; latency at "
        "50%% and 90%% of the maximum; feedback events; RSS; scale-out; full-queue RSS; "
        "ingest with and without a concurrent query load.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, <= 5 min on 2 cores (CI smoke run)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERNS",
        help="comma-separated fnmatch patterns of scenario names, e.g. 'core-sqlite-*' "
        "(repeatable; see --list)",
    )
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where ingest.json, throughput.png and latency.png go (default {RESULTS_DIR})",
    )
    parser.add_argument(
        "--publishers", type=int, default=1, help="publisher processes per run (default 1)"
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="record a py-spy speedscope profile of the service during each throughput "
        "phase (into the output dir; needs py-spy in the venv)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args(argv)
    if args.publishers < 1:
        parser.error("--publishers must be at least 1")
    if args.only:
        args.only = [p.strip() for arg in args.only for p in arg.split(",") if p.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 1 when records were lost or a service crashed."""
    args = parse_args(argv)
    if args.list:
        print("\n".join(select(args.only)))
        return 0
    report = run_benchmark(args)
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "ingest.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    charts = write_charts(report, out_dir)
    print(f"\nJSON report: {json_path}")
    for chart in charts:
        print(f"chart: {chart}")
    print(f"wall time: {report['wall_time_s']:.0f} s")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
