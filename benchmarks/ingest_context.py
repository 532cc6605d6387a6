"""What the scenarios of an ingest benchmark run share: the run context and the progress bar.

:class:`RunContext` holds the run's servers, preset, payload sets and the ceilings
(each measured once, on first use, and shared by the scenarios that need it), and
makes each scenario's fresh database; :class:`Progress` is the progress bar on stderr
and the log lines above it; :class:`ServiceRun` is what the steps of one matrix or
scale-out scenario share.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from benchmarks.ingest_ceilings import (
    measure_bare_subscriber,
    measure_raw_copy_merge,
    measure_raw_executemany,
)
from benchmarks.ingest_infra import (
    FlowControl,
    LoopThread,
    ServiceProcess,
    create_pg_database,
    delete_stream,
    drop_pg_database,
    service_settings,
)
from benchmarks.ingest_roles import CORE, JETSTREAM
from benchmarks.ingest_scenarios import (
    DEFAULTS,
    MIXED_KIND,
    MIXED_PER_MSG,
    PG_SINKS,
    TIMESCALEDB,
    PayloadSet,
    PhasePayloads,
    Preset,
    Scenario,
    TsAllocator,
)
from store_svc.devtools.pgserver import PostgresServer
from store_svc.settings import Settings


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
    cpu_roots: dict[str, int | list[int]] = field(default_factory=dict)

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
                nats_pid=self.cpu_roots.get("nats_server"),
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
            if sink in PG_SINKS:
                assert self.pg is not None
                url = create_pg_database(self.pg, f"raw-{key}")
                layout: Literal["require", "off"] = "require" if sink == TIMESCALEDB else "off"
                try:
                    b = measure_raw_copy_merge(
                        kind,
                        pset.payloads(),
                        url,
                        DEFAULTS,
                        layout,
                        pg_pid=self.cpu_roots.get("postgresql"),
                    )
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

    def require_pg(self, sink: str) -> None:
        """Fail a PostgreSQL scenario when the run has no PostgreSQL server."""
        if sink in PG_SINKS and self.pg is None:
            raise RuntimeError("no PostgreSQL server (see the log above)")

    def scenario_database(self, name: str, sink: str) -> tuple[Path, str]:
        """A scenario's work folder (created) and its fresh database: a SQLite file in
        the folder, or a new database on the run's PostgreSQL server.

        Returns:
            The folder and the database URL.
        """
        workdir = self.workroot / name
        workdir.mkdir()
        if sink in PG_SINKS:
            assert self.pg is not None
            database_url = create_pg_database(self.pg, name)
        else:
            database_url = f"sqlite:///{(workdir / 'service.db').resolve()}"
        return workdir, database_url


@dataclass
class ServiceRun:
    """What the steps of one matrix or scale-out scenario share.

    Attributes:
        sc: the scenario.
        pset: its payloads.
        database_url: its fresh database.
        settings: the settings of its service instances.
        subject: the write subject of its record kind.
        flow: the throughput publishers' flow control.
        services: its service instances (not started yet when made).
    """

    sc: Scenario
    pset: PayloadSet
    database_url: str
    settings: Settings
    subject: str
    flow: FlowControl
    services: list[ServiceProcess]

    @property
    def on_js(self) -> bool:
        """The scenario runs in JetStream mode."""
        return self.sc.mode == JETSTREAM

    def check_alive(self) -> None:
        """Raise when a service instance has exited."""
        for service in self.services:
            service.check_alive()


def fmt_ms(value: float | None) -> str:
    """A value in ms for a log line: one decimal, ``-`` for None."""
    return "-" if value is None else f"{value:.1f}"
