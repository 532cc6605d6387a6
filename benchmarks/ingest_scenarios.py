"""The ingest benchmark's scenarios, presets and payloads: what a run measures, and on what.

* the scenario names: the matrix (:class:`Scenario`), scale-out, the mixed-load
  scenarios (:class:`MixedScenario`) and ``rss-full-queue``; :func:`select` picks them
  by ``--only`` patterns;
* :class:`Preset`: the sizes of a ``--quick`` or full run;
* payloads: :class:`TsAllocator` (disjoint timestamps), :func:`make_payloads`,
  :class:`PayloadSet` (a throughput file and a latency pool per records per message
  and kind) and :class:`PhasePayloads` (one mixed-load ingest phase).
"""

from __future__ import annotations

import fnmatch
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from benchmarks.ingest_infra import FlowControl
from benchmarks.ingest_roles import CORE, JETSTREAM, load_payloads, save_payloads
from store_svc.devtools.demo import SYMBOLS, synthetic_records
from store_svc.settings import Settings

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
#: PostgreSQL with the tables as TimescaleDB hypertables (the same server, preloaded;
#: ``postgresql`` scenarios run with ``STORE_TIMESCALEDB=off``).
TIMESCALEDB = "timescaledb"
PG_SINKS = (POSTGRESQL, TIMESCALEDB)
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


# ------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Scenario:
    """One service scenario of the matrix (or a scale-out one).

    Attributes:
        mode: the service's ingest mode, ``core`` or ``jetstream``.
        sink: ``sqlite``, ``postgresql`` or ``timescaledb``.
        per_msg: records per message.
        kind: ``trades`` or ``bars``.
        instances: service instances sharing the work (2 for scale-out).
        replicas: JetStream replicas of the stream and consumer; above 1 the
            scenario runs on a three-node NATS cluster (``-r3`` after the name).
    """

    mode: str
    sink: str
    per_msg: int
    kind: str
    instances: int = 1
    replicas: int = 1

    @property
    def base_name(self) -> str:
        """The matrix name, ``<mode>-<sink>-<per_msg>-<kind>`` (``-r<n>`` on a cluster)."""
        name = f"{self.mode}-{self.sink}-{self.per_msg}-{self.kind}"
        return f"{name}-r{self.replicas}" if self.replicas > 1 else name

    @property
    def name(self) -> str:
        """The scenario's name (``scaleout-`` in front for several instances)."""
        return f"{SCALEOUT_PREFIX}{self.base_name}" if self.instances > 1 else self.base_name


MATRIX = (
    *(
        Scenario(mode, sink, per_msg, kind)
        for mode in MODES
        for sink in SINKS
        for per_msg in RECORDS_PER_MSG
        for kind in RECORD_KINDS
    ),
    # Where the database's cost shows: against postgresql-<n> in the same run.
    *(
        Scenario(mode, TIMESCALEDB, per_msg, kind)
        for mode in MODES
        for per_msg in (100, 1000)
        for kind in RECORD_KINDS
    ),
)
SCALEOUT = tuple(Scenario(mode, POSTGRESQL, 1000, "trades", instances=2) for mode in MODES)
#: JetStream R3 on a three-node cluster, against the R1 matrix scenarios of the same run.
CLUSTER = tuple(
    Scenario(JETSTREAM, SQLITE, per_msg, "trades", replicas=3) for per_msg in (100, 1000)
)


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
    *(s.name for s in CLUSTER),
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


# ------------------------------------------------------------------- selection


def select(patterns: Sequence[str] | None) -> list[str]:
    """Scenario names matching ``patterns`` (all when none), in run order.

    A scale-out scenario brings its single-instance twin along, an R3 one its R1 twin.

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
    for s in CLUSTER:
        if s.name in chosen:
            chosen.add(s.name.removesuffix(f"-r{s.replicas}"))
    return [n for n in ALL_NAMES if n in chosen]
