"""The matrix and scale-out scenarios of the ingest benchmark: one service scenario, by step.

:func:`run_service_scenario` starts the service instances, publishes the throughput
phase (feedback counted, RSS sampled), waits until every record is committed and
collects the phase, runs the latency phases (:mod:`benchmarks.ingest_latency`), stops
the services and compares the result with the ceilings (and, for scale-out, with its
single-instance twin).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

from benchmarks.ingest_context import RunContext, ServiceRun
from benchmarks.ingest_cpu import ProcessCpu
from benchmarks.ingest_infra import (
    FeedbackCounter,
    RssSampler,
    ServiceProcess,
    delete_stream,
    drop_pg_database,
    jetstream_state,
    probe_core,
    probe_jetstream,
    run_publishers,
    service_settings,
    shutdown_failure,
    start_py_spy,
    stop_py_spy,
    summarize,
    wait_rows,
    wait_stream_drained,
)
from benchmarks.ingest_latency import run_latency_phases
from benchmarks.ingest_roles import PublishResult
from benchmarks.ingest_scenarios import PG_SINKS, TIMESCALEDB, Scenario


def run_service_scenario(ctx: RunContext, sc: Scenario) -> dict[str, Any]:
    """One matrix or scale-out scenario: ceilings (shared), throughput with feedback and
    RSS, the row-count check, and latency at 50 % and 90 % of the maximum.

    Returns:
        The scenario's section of the JSON report (``failures`` lists what must make
        the run fail).
    """
    p = ctx.progress
    ctx.require_pg(sc.sink)
    pset = ctx.payload_set(sc.per_msg, sc.kind)
    a_key, a = ctx.ceiling_a(sc.per_msg, sc.kind)
    b_key, b = ctx.ceiling_b(sc.sink, sc.per_msg, sc.kind)
    workdir, database_url = ctx.scenario_database(sc.name, sc.sink)
    layout: Literal["require", "off"] = "require" if sc.sink == TIMESCALEDB else "off"
    settings = service_settings(ctx.url, database_url, sc.mode, layout, sc.replicas)
    run = ServiceRun(
        sc,
        pset,
        database_url,
        settings,
        subject=settings.subject("store", "write", sc.kind),
        flow=ctx.preset.flow(sc.mode, sc.per_msg),
        services=[
            ServiceProcess(settings, workdir / f"service-{i}.log") for i in range(sc.instances)
        ],
    )
    out = _describe(ctx, run)
    out["ceilings"] = {
        "A_key": a_key,
        "A_records_per_s": a["records_per_s"],
        "A_cpu_us_per_msg": a.get("cpu_us_per_msg"),
        "B_key": b_key,
        "B_rows_per_s": b["rows_per_s"],
        "B_method": b["method"],
        "B_cpu_us_per_row": b.get("cpu_us_per_row"),
    }
    failures: list[str] = []
    delete_stream(ctx.url, settings.js_stream)
    sampler: RssSampler | None = None
    svc: dict[str, Any] = {}
    try:
        sampler = _start_services(ctx, run)
        idle_mb = sampler.peak_mb()
        meter = ProcessCpu([s.pid for s in run.services], ctx.cpu_roots)
        cpu0 = meter.read()
        results, drained, fb, t_end_phase = _publish(ctx, run)
        svc = _collect_throughput(run, results, drained, t_end_phase)
        svc["cpu_us_per_record"] = ProcessCpu.per_record(cpu0, meter.read(), svc["stored"])
        svc.update(
            {
                "feedback": fb,
                "rss_mb_idle": idle_mb,
                "peak_rss_mb_throughput": sampler.peak_mb(until=t_end_phase),
            }
        )
        p.log(
            f"{svc['rows_per_s']:,.0f} rows/s ({svc['rows_per_s'] / a['records_per_s']:.2f} A, "
            f"{svc['rows_per_s'] / b['rows_per_s']:.2f} B), "
            f"{svc['cpu_us_per_record'].get('service', math.nan):.1f} CPU µs/record, "
            f"lost {svc['lost']}, feedback ok/soft/hard {fb['ok']}/{fb['soft']}/{fb['hard']}"
        )
        phases = run_latency_phases(ctx, run, svc["msgs_per_s"])
        out["latency"] = phases
        svc["lost_total"] = svc["lost"] + sum(ph["lost"] for ph in phases)
        svc["refused_total"] = svc["refused_records"] + sum(ph["refused_records"] for ph in phases)
    finally:
        shutdowns = _stop_services(ctx, run, sampler, svc, out)
    for i, sd in enumerate(shutdowns):
        if sd["crashed"]:
            failures.append(shutdown_failure(f"{sc.name}: service {i + 1}", sd))
    if svc.get("lost_total"):
        failures.append(f"{sc.name}: {svc['lost_total']:,} records lost")
    out.update(_ratios(ctx, sc, svc, a, b))
    out["failures"] = failures
    return out


def _describe(ctx: RunContext, run: ServiceRun) -> dict[str, Any]:
    """The scenario's section of the report before it runs: what it is and its sizes."""
    sc, pset, flow = run.sc, run.pset, run.flow
    return {
        "name": sc.name,
        "group": "scaleout" if sc.instances > 1 else "matrix",
        "mode": sc.mode,
        "sink": sc.sink,
        "records_per_msg": sc.per_msg,
        "kind": sc.kind,
        "instances": sc.instances,
        "replicas": sc.replicas,
        "messages": pset.n_msgs,
        "payload_bytes": pset.payload_bytes,
        "flow_control": {"pub_ack_window_msgs": flow.window}
        if run.on_js
        else {"chunk_msgs": flow.chunk, "window_requests": flow.window},
        "publishers": ctx.publishers,
    }


def _start_services(ctx: RunContext, run: ServiceRun) -> RssSampler:
    """Start the instances one after the other, each probed until it takes writes.

    Returns:
        The RSS sampler of their process trees, started.
    """
    p = ctx.progress
    for i, service in enumerate(run.services):
        p.phase(f"starting service {i + 1}/{run.sc.instances}")
        service.start()
        if run.on_js:
            asyncio.run(probe_jetstream(ctx.url, run.settings, timeout=30.0))
        else:
            asyncio.run(probe_core(ctx.url, run.subject, timeout=30.0))
    return RssSampler([s.pid for s in run.services], ctx.preset.rss_interval).start()


def _publish(
    ctx: RunContext, run: ServiceRun
) -> tuple[list[PublishResult], tuple[float | None, dict[str, Any]] | None, dict[str, Any], float]:
    """The throughput phase: the publishers send the payload set, with the feedback
    events counted (and, with ``--py-spy``, the first instance profiled).

    Returns:
        The publishers' results; JetStream: when the stream was drained (None when it
        stalled) and its state; the feedback counts; when the phase ended.
    """
    p = ctx.progress
    sc, pset, settings = run.sc, run.pset, run.settings
    p.phase(f"throughput ({pset.n_msgs:,} msgs x {sc.per_msg})")
    feedback = FeedbackCounter(ctx.lt, ctx.url, settings.subject("telemetry", "feedback"))
    feedback.start()
    watch = (
        ctx.lt.submit(
            wait_stream_drained(ctx.url, settings.js_stream, pset.n_msgs, stall_timeout=60.0)
        )
        if run.on_js
        else None
    )
    spy = None
    if ctx.profile_dir is not None:
        profile = ctx.profile_dir / f"service-{sc.name}.speedscope.json"
        spy = start_py_spy(run.services[0].pid, profile)
        time.sleep(1.0)  # let py-spy attach before the load starts
    try:
        results = run_publishers(
            ctx.url, run.subject, pset.file, pset.n_msgs, sc.mode, run.flow, ctx.publishers
        )
        drained = watch.result(timeout=900.0) if watch is not None else None
    finally:
        stop_py_spy(spy)
        fb = feedback.stop()
        if watch is not None and not watch.done():
            watch.cancel()
    t_end_phase = time.monotonic()
    run.check_alive()
    return results, drained, fb, t_end_phase


def _collect_throughput(
    run: ServiceRun,
    results: list[PublishResult],
    drained: tuple[float | None, dict[str, Any]] | None,
    t_end_phase: float,
) -> dict[str, Any]:
    """Wait until the published records are committed, and summarise the phase.

    Returns:
        The publishers' summary with the end of the run, the row count (stored,
        refused, lost) and the committed rows/s and msgs/s.
    """
    sc = run.sc
    tp = summarize(results, sc.per_msg)
    refused = tp.error_replies * sc.per_msg
    # The last reply (core) or the drained stream (JetStream) means every record is
    # committed, unless a message was refused or a wait timed out: then the count
    # is awaited until it stops growing.
    stored = wait_rows(run.database_url, sc.kind, tp.published_records - refused)
    svc = tp.as_dict()
    if run.on_js:
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
        }
    )
    return svc


def _stop_services(
    ctx: RunContext,
    run: ServiceRun,
    sampler: RssSampler | None,
    svc: dict[str, Any],
    out: dict[str, Any],
) -> list[dict[str, Any]]:
    """Stop the instances and the sampler, record the peak RSS, the shutdowns (and the
    stream's state) in ``svc`` and ``out``, and remove the stream and the database.

    Returns:
        Each instance's shutdown.
    """
    sc, settings = run.sc, run.settings
    ctx.progress.phase("stopping")
    shutdowns = [s.stop() for s in run.services]
    if sampler is not None:
        sampler.stop()
        svc["peak_rss_mb"] = sampler.peak_mb()
        svc["peak_rss_mb_per_instance"] = sampler.peak_per_root_mb()
    svc["service_shutdown"] = shutdowns
    out["service"] = svc
    if run.on_js:
        out["jetstream"] = jetstream_state(ctx.url, settings)
        delete_stream(ctx.url, settings.js_stream)
    if ctx.pg is not None and sc.sink in PG_SINKS:
        drop_pg_database(ctx.pg, run.database_url)
    return shutdowns


def _ratios(
    ctx: RunContext, sc: Scenario, svc: dict[str, Any], a: dict[str, Any], b: dict[str, Any]
) -> dict[str, Any]:
    """The service's rows/s over ceilings A and B (and, for scale-out, over its
    single-instance twin of the same run).

    Returns:
        ``ratios`` (and the twin's name and rate) for the scenario's section.
    """
    out: dict[str, Any] = {}
    out["ratios"] = {
        "service_vs_bare_subscriber": svc["rows_per_s"] / a["records_per_s"],
        "service_vs_raw_sink": svc["rows_per_s"] / b["rows_per_s"],
        **_cpu_ratios(sc, svc.get("cpu_us_per_record") or {}, a, b),
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
    return out


def _cpu_ratios(
    sc: Scenario, cpu: dict[str, Any], a: dict[str, Any], b: dict[str, Any]
) -> dict[str, float]:
    """The service's CPU per record over the ceilings' (same run).

    * ``cpu_vs_bare_subscriber``: the service's CPU per message (all its processes)
      over the bare subscriber's;
    * ``cpu_vs_raw_sink``: SQLite: the service's CPU per row over ``executemany``'s
      (``cpu_vs_raw_convert_plus_executemany`` with the conversion); PostgreSQL: the
      service's and the server's CPU per row over the raw client's and the server's.
    """
    service = cpu.get("service")
    if service is None:
        return {}
    out: dict[str, float] = {}
    if a.get("cpu_us_per_msg"):
        out["cpu_vs_bare_subscriber"] = service * sc.per_msg / a["cpu_us_per_msg"]
    if b.get("cpu_us_per_row"):
        mine = service + (cpu.get("postgresql") or 0.0) if sc.sink in PG_SINKS else service
        out["cpu_vs_raw_sink"] = mine / b["cpu_us_per_row"]
    if b.get("convert_plus_executemany_cpu_us_per_row"):
        out["cpu_vs_raw_convert_plus_executemany"] = (
            service / b["convert_plus_executemany_cpu_us_per_row"]
        )
    return out


def _deep(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
