"""The mixed-load scenarios of the ingest benchmark: ingest with and without a query load.

``mixed-query-<sink>``: one service (core mode, default settings) on a fresh database;
three ingest phases of fresh 100-record trade messages, (a) alone, (b) with the paced
query load of ``ingest_roles.py --query-load``, (c) alone again; the ratio is b over
the mean of a and c. Then the query client runs closed-loop with no ingest (the read
path's maximum). :func:`summarize_query_load` checks and summarises a query run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from benchmarks.ingest_context import RunContext, fmt_ms
from benchmarks.ingest_infra import (
    CpuMeter,
    FeedbackCounter,
    FlowControl,
    RssSampler,
    ServiceProcess,
    await_ready,
    collect,
    count_stored,
    delete_stream,
    drop_pg_database,
    probe_core,
    reap,
    run_publishers,
    send_line,
    service_settings,
    shutdown_failure,
    spawn,
    summarize,
    wait_rows,
)
from benchmarks.ingest_latency import percentile
from benchmarks.ingest_roles import (
    _GO,
    _STOP,
    CLOSED_LOOP,
    CORE,
    PublishResult,
    QueryLoadResult,
    QueryLoadSpec,
)
from benchmarks.ingest_scenarios import (
    LATEST_SYMBOLS,
    LATEST_WORKERS,
    MIXED_KIND,
    MIXED_PER_MSG,
    POSTGRESQL,
    QUERY_CHAINS,
    QUERY_IN_FLIGHT,
    QUERY_PAGE_LIMIT,
    MixedScenario,
    PhasePayloads,
    rfc3339_us,
)
from store_svc.settings import Settings

_T = TypeVar("_T")


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
    ctx.require_pg(sc.sink)
    phases = ctx.mixed_payloads()
    workdir, database_url = ctx.scenario_database(sc.name, sc.sink)
    settings = service_settings(ctx.url, database_url)
    subject = settings.subject("store", "write", MIXED_KIND)
    flow = ctx.preset.flow(CORE, MIXED_PER_MSG)
    first = phases[0]
    load_spec = _query_load_spec(ctx, settings, first)
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
        out["queries_alone"] = _queries_alone(ctx, alone_spec, meter, first)
        service.check_alive()
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
        failures.append(shutdown_failure(f"{sc.name}: service", shutdown))
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


def _query_load_spec(ctx: RunContext, settings: Settings, first: PhasePayloads) -> QueryLoadSpec:
    """The paced query load of phase b: pages over the time range of ``first``'s
    records and latest lookups, at the preset's rates."""
    return QueryLoadSpec(
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


def _queries_alone(
    ctx: RunContext, alone_spec: QueryLoadSpec, meter: CpuMeter, first: PhasePayloads
) -> dict[str, Any]:
    """The closed-loop query run with no ingest, for the preset's seconds.

    Returns:
        Its summary (see :func:`summarize_query_load`) with its wall time and CPU
        seconds per process tree.
    """
    ctx.progress.phase(f"queries alone, closed loop ({ctx.preset.queries_alone_seconds:g} s)")
    seconds = ctx.preset.queries_alone_seconds
    cpu0, t0 = meter.read(), time.monotonic()
    _, alone = _with_query_load(alone_spec, lambda: time.sleep(seconds))
    wall = time.monotonic() - t0
    cpu = CpuMeter.used(cpu0, meter.read(), wall)
    cpu["query_client_cpu_s"] = round(alone.cpu_seconds, 3)
    summary = summarize_query_load(alone, alone_spec, first)
    summary.update({"wall_s": round(wall, 3), "cpu": cpu})
    return summary


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
                f"{e['ok_per_s']:,.1f} {unit}/s (p50 {fmt_ms(e['p50_ms'])} / p99 "
                f"{fmt_ms(e['p99_ms'])} ms, {e['records_per_s']:,.0f} rec/s, "
                f"errors {sum(e['errors'].values())})"
            )
    return "; ".join(parts)
