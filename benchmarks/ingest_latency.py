"""The latency phases of the ingest benchmark: publish→commit at a fraction of the maximum.

After a scenario's throughput phase, a paced publisher (its own process, see
``ingest_roles.py --paced``) sends fresh records at 50 % and 90 % of the measured
maximum msgs/s (:data:`~benchmarks.ingest_scenarios.LATENCY_FRACTIONS`); core: the
reply to sampled requests, JetStream: the service's ack of every message.
:func:`percentile` is shared with the mixed-load summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.ingest_context import RunContext, ServiceRun, fmt_ms
from benchmarks.ingest_infra import (
    await_ready,
    collect,
    count_stored,
    reap,
    send_line,
    spawn,
    wait_rows,
)
from benchmarks.ingest_roles import _GO, JETSTREAM, PacedResult, PacedSpec
from benchmarks.ingest_scenarios import LATENCY_FRACTIONS
from store_svc.settings import Settings


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


def run_latency_phases(
    ctx: RunContext, run: ServiceRun, max_msgs_per_s: float
) -> list[dict[str, Any]]:
    """Latency at each of :data:`LATENCY_FRACTIONS` of the throughput phase's rate, on
    fresh records from the payload set's latency pool, each phase followed by the
    row-count check.

    Args:
        ctx: the run.
        run: the scenario, its services running.
        max_msgs_per_s: the throughput phase's committed msgs/s.

    Returns:
        One summary per phase (see :func:`measure_latency`) with its row count.
    """
    p = ctx.progress
    sc, pset, database_url = run.sc, run.pset, run.database_url
    rates = [max(1.0, max_msgs_per_s * f) for f in LATENCY_FRACTIONS]
    counts = [max(20, int(r * ctx.preset.latency_seconds)) for r in rates]
    pool = pset.latency_pool(sum(counts))
    phases: list[dict[str, Any]] = []
    first = 0
    for fraction, rate, n in zip(LATENCY_FRACTIONS, rates, counts, strict=True):
        p.phase(f"latency at {fraction:.0%} ({rate:,.0f} msgs/s)")
        before = count_stored(database_url, sc.kind)
        phase = measure_latency(
            ctx.url,
            run.settings,
            run.subject,
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
        run.check_alive()
        p.log(
            f"latency at {fraction:.0%}: p50 {fmt_ms(phase['p50_ms'])} / p99 "
            f"{fmt_ms(phase['p99_ms'])} ms at {phase['achieved_rows_per_s']:,.0f} rows/s, "
            f"lost {phase['lost']}"
        )
    return phases
