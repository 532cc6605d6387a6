"""Ingest benchmark of ``store-svc``: a scenario matrix against ceilings, in one command.

Runs the real ``store-svc run`` in every selected scenario (ingest mode x sink x records
per message x kind, scale-out, ingest with a query load, ``rss-full-queue``) on a private
nats-server (and PostgreSQL server), next to ceilings measured in the same run; prints
tables on stdout and writes ``ingest.json``, ``throughput.png``, ``latency.png`` and
``cpu.png`` to ``--output-dir``. Exit code 1 when a scenario lost records, a service crashed or a
scenario could not run; a missed target never changes it. How to run (from the
repository root, in the project's venv)::

    .venv/bin/python benchmarks/bench_ingest.py            # full preset
    .venv/bin/python benchmarks/bench_ingest.py --quick    # CI smoke run
    .venv/bin/python benchmarks/bench_ingest.py --only 'core-sqlite-*,rss-full-queue'
    .venv/bin/python benchmarks/bench_ingest.py --list     # the scenario names

docs/benchmarks.md describes the scenarios, ceilings, presets and how to read the
results. The phases: ``ingest_scenarios.py`` (names, presets, payloads),
``ingest_throughput.py``, ``ingest_latency.py``, ``ingest_mixed.py``, ``ingest_rss.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ingest_context import Progress, RunContext
from benchmarks.ingest_infra import LoopThread, git_state, machine_info, pg_version, postmaster_pid
from benchmarks.ingest_mixed import run_mixed_scenario
from benchmarks.ingest_report import (
    TARGET_P99_AT_FRACTION,
    latency_at,
    print_report,
    targets,
    write_charts,
)
from benchmarks.ingest_rss import run_rss_full_queue
from benchmarks.ingest_scenarios import (
    CLUSTER,
    DEFAULTS,
    FULL,
    LATENCY_FRACTIONS,
    LATEST_SYMBOLS,
    LATEST_WORKERS,
    MATRIX,
    MIXED,
    MIXED_PER_MSG,
    PG_SINKS,
    QUERY_CHAINS,
    QUERY_IN_FLIGHT,
    QUERY_PAGE_LIMIT,
    QUICK,
    RSS_FULL_QUEUE,
    SCALEOUT,
    TIMESCALEDB,
    Preset,
    select,
)
from benchmarks.ingest_throughput import run_service_scenario
from store_svc.devtools.natscluster import NatsCluster
from store_svc.devtools.natsserver import NatsServer
from store_svc.devtools.pgserver import PostgresServer, has_extension

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected scenarios on one private nats-server and build the report."""
    preset = QUICK if args.quick else FULL
    names = select(args.only)
    sink_of = {s.name: s.sink for s in (*MATRIX, *SCALEOUT, *CLUSTER)}
    sink_of.update((s.name, s.sink) for s in MIXED)
    timescale = has_extension("timescaledb")
    if not timescale:
        left_out = [n for n in names if sink_of.get(n) == TIMESCALEDB]
        if left_out:
            print(
                f"TimescaleDB is not installed in this machine's PostgreSQL: "
                f"{len(left_out)} timescaledb scenarios left out",
                file=sys.stderr,
            )
        names = [n for n in names if n not in left_out]
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
        if any(sink_of.get(n) in PG_SINKS for n in names):
            progress.phase("starting PostgreSQL")
            try:
                # Preloaded where installed: the postgresql scenarios then run on plain
                # tables and the timescaledb ones on hypertables of the same server.
                pg = PostgresServer(preload=("timescaledb",) if timescale else ())
                stack.callback(pg.close)  # also after a failed start: the folder goes
                pg.start()
                progress.log(f"PostgreSQL on {pg.dsn}")
                info["postgresql"] = pg_version()
                info["timescaledb_preloaded"] = timescale
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
        on_cluster = {s.name for s in CLUSTER}
        cluster: NatsCluster | None = None
        cluster_ctx: RunContext | None = None
        for name in names:
            progress.start(name)
            t0 = time.monotonic()
            if name in on_cluster:
                if cluster is None:
                    cluster = _start_cluster(ctx)
                    if cluster is not None:
                        stack.callback(cluster.stop)
                        cluster_ctx = _on_cluster(ctx, cluster)
                result = (
                    _run_scenario(cluster_ctx, name)
                    if cluster_ctx is not None
                    else _not_run(name, "the three-node NATS cluster could not start")
                )
            else:
                if cluster is not None:  # the R3 scenarios are done: no cluster beside the rest
                    cluster.stop()
                    cluster, cluster_ctx = None, None
                result = _run_scenario(ctx, name)
            result["wall_s"] = round(time.monotonic() - t0, 1)
            failures.extend(result["failures"])
            scenarios.append(result)
            ctx.results[name] = result
            progress.advance()
    _compare_replicas(scenarios)
    info["loadavg_at_end"] = os.getloadavg()
    info["git_at_end"] = git_state()
    defaults = DEFAULTS.model_dump(mode="json", exclude={"admin_token", "nats_url", "database_url"})
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "preset": preset.name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.monotonic() - started, 1),
        "command": sys.argv,
        "machine": info,
        "service_settings": defaults,
        "preset_sizes": _preset_sizes(preset),
        "publishers": args.publishers,
        "ceilings": {"bare_subscriber": ctx.ceilings_a, "raw_sink": ctx.ceilings_b},
        "scenarios": scenarios,
        "failures": failures,
    }
    report["targets"] = targets(report)
    return report


def _compare_replicas(scenarios: list[dict[str, Any]]) -> None:
    """Give each R3 scenario its R1 twin of the same run: rows/s ratio and p99s."""
    by_name = {s["name"]: s for s in scenarios}
    for s in scenarios:
        replicas = s.get("replicas", 1)
        if replicas <= 1 or "service" not in s:
            continue
        twin = by_name.get(s["name"].removesuffix(f"-r{replicas}"))
        if twin is None or "service" not in twin:
            continue
        rate, twin_rate = s["service"].get("rows_per_s"), twin["service"].get("rows_per_s")
        s["r1_scenario"] = twin["name"]
        s.setdefault("ratios", {})["rows_per_s_vs_r1"] = (
            round(rate / twin_rate, 3) if rate and twin_rate else None
        )
        p99 = {}
        for name, sc in (("r3", s), ("r1", twin)):
            phase = latency_at(sc, TARGET_P99_AT_FRACTION)
            p99[name] = None if phase is None else phase.get("p99_ms")
        s["p99_ms_at_50pct"] = p99


def _start_cluster(ctx: RunContext) -> NatsCluster | None:
    """A three-node NATS cluster for the R3 scenarios (None when it cannot start)."""
    ctx.progress.phase("starting a three-node NATS cluster")
    try:
        cluster = NatsCluster(ctx.workroot / "cluster").start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        ctx.progress.log(f"the NATS cluster could not start: {exc!r}")
        return None
    ctx.progress.log(f"NATS cluster on {cluster.url}")
    return cluster


def _on_cluster(ctx: RunContext, cluster: NatsCluster) -> RunContext:
    """A run context on ``cluster``: the same payloads, ceilings and results, and
    nats-server's CPU summed over the nodes."""
    roots = dict(ctx.cpu_roots)
    roots["nats_server"] = [n.proc.pid for n in cluster.nodes if n.proc is not None]
    return dataclasses.replace(ctx, url=cluster.url, cpu_roots=roots)


def _not_run(name: str, why: str) -> dict[str, Any]:
    return {"name": name, "group": "error", "error": why, "failures": [f"{name}: {why}"]}


def _run_scenario(ctx: RunContext, name: str) -> dict[str, Any]:
    """Run one scenario by name; a scenario that raises becomes an ``error`` section."""
    by_name = {s.name: s for s in (*MATRIX, *SCALEOUT, *CLUSTER)}
    mixed_by_name = {s.name: s for s in MIXED}
    try:
        if name == RSS_FULL_QUEUE:
            result = run_rss_full_queue(ctx)
        elif name in mixed_by_name:
            result = run_mixed_scenario(ctx, mixed_by_name[name])
        else:
            result = run_service_scenario(ctx, by_name[name])
    except Exception as exc:
        ctx.progress.log(f"FAILED: {exc!r}")
        result = {
            "name": name,
            "group": "error",
            "error": repr(exc),
            "traceback": traceback.format_exc(),
            "failures": [f"{name}: could not run: {exc!r}"],
        }
    return result


def _preset_sizes(preset: Preset) -> dict[str, Any]:
    """The report's ``preset_sizes``: what the preset and the mixed-load constants set."""
    return {
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
    }


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
        help=f"where ingest.json and the charts go (default {RESULTS_DIR})",
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
