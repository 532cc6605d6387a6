"""Targets, the printed tables and the PNG charts of the ingest benchmark report.

Works on the JSON report only (a ``dict`` as written to ``ingest.json``), so the
tables and charts can be made again from a saved report::

    .venv/bin/python -c "import json, sys; sys.path.insert(0, '.'); \\
        from benchmarks.ingest_report import print_report; \\
        print_report(json.load(open('benchmarks/results/ingest.json')))"
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: Targets of issue 7 (printed with met/missed and margin; never an exit code).
#: Issue 17's goals: CPU per record against the ceilings, rates against each other.
TARGET_CORE_SINGLE_CPU_VS_BARE = 1.0
TARGET_CORE_BATCH_SQLITE_CPU_VS_RAW = 1.5
TARGET_CORE_BATCH_PG_VS_RAW = 0.9
TARGET_JS_SINGLE_VS_CORE = 0.8
TARGET_JS_BATCH_VS_RAW = 0.7
TARGET_P99_MS = 20.0
TARGET_P99_PG_MS = 30.0
TARGET_P99_AT_FRACTION = 0.5
TARGET_RSS_MB = 300.0
#: Mixed load: ingest rows/s with a concurrent query load >= this x without it.
TARGET_MIXED_RATIO = 0.8

# ---------------------------------------------------------------------- helpers


def _get(d: Any, *path: str | int) -> Any:
    """``d[path[0]][path[1]]...`` or None where a step is missing."""
    for key in path:
        in_dict = isinstance(d, dict) and isinstance(key, str) and key in d
        in_list = isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)
        if in_dict or in_list:
            d = d[key]
        else:
            return None
    return d


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``-`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def latency_at(scenario: dict[str, Any], fraction: float) -> dict[str, Any] | None:
    """The latency phase of a scenario at ``fraction`` of its maximum."""
    for phase in scenario.get("latency") or []:
        if abs(phase.get("fraction_of_max", -1) - fraction) < 1e-9:
            return phase  # type: ignore[no-any-return]
    return None


def _matrix(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scenarios that measured service throughput (matrix and scale-out)."""
    return [s for s in scenarios if s.get("group") in ("matrix", "scaleout") and "service" in s]


def _mixed(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mixed-load scenarios that measured their three ingest phases."""
    return [s for s in scenarios if s.get("group") == "mixed" and "ratios" in s]


# ---------------------------------------------------------------------- targets


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target checked against the results, with ``met`` and ``margin``.

    * core, 1 record per message: the service's CPU per message ≤ 1.0 x the bare
      subscriber's (ceiling A);
    * core, 1000 records per message, SQLite: the service's CPU per row ≤ 1.5 x raw
      ``executemany``'s (ceiling B);
    * core, 1000 records per message, PostgreSQL: rows/s ≥ 0.9 x raw COPY + merge;
    * JetStream, 1 record per message: rows/s ≥ 0.8 x core mode's (same sink and kind);
    * JetStream, 1000 records per message: rows/s ≥ 0.7 x ceiling B;
    * every scenario: p99 publish→commit at 50 % of its maximum ≤ 20 ms (SQLite) or
      ≤ 30 ms (PostgreSQL, TimescaleDB);
    * ``rss-full-queue``: peak RSS of the service tree ≤ 300 MB with the queue full;
    * ``mixed-query-*``: ingest rows/s with the query load ≥ 0.8 x the mean of the
      phases without it.
    """
    out: list[dict[str, Any]] = []

    def add(
        scenario: str, metric: str, value: float | None, target: float, op: str, label: str
    ) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met, margin = False, None
        elif op == ">=":
            met, margin = value >= target, value - target
        else:
            met, margin = value <= target, target - value
        out.append(
            {
                "target": label,
                "scenario": scenario,
                "metric": metric,
                "value": value,
                "op": op,
                "threshold": target,
                "met": met,
                "margin": margin,
            }
        )

    # R3 scenarios are compared with their R1 twins instead (r1_scenario).
    matrix = [
        s
        for s in _matrix(report["scenarios"])
        if s["group"] == "matrix" and s.get("replicas", 1) == 1
    ]
    by_name = {s["name"]: s for s in matrix}
    for s in matrix:
        ratios = s.get("ratios", {})
        core, per_msg, sink = s["mode"] == "core", s["records_per_msg"], s["sink"]
        if core and per_msg == 1:
            add(
                s["name"],
                "cpu_vs_bare_subscriber",
                ratios.get("cpu_vs_bare_subscriber"),
                TARGET_CORE_SINGLE_CPU_VS_BARE,
                "<=",
                "core 1/msg CPU vs A",
            )
        if core and per_msg == 1000 and sink == "sqlite":
            add(
                s["name"],
                "cpu_vs_raw_sink",
                ratios.get("cpu_vs_raw_sink"),
                TARGET_CORE_BATCH_SQLITE_CPU_VS_RAW,
                "<=",
                "core 1000/msg SQLite CPU vs B",
            )
        if core and per_msg == 1000 and sink != "sqlite":
            add(
                s["name"],
                "service_vs_raw_sink",
                ratios.get("service_vs_raw_sink"),
                TARGET_CORE_BATCH_PG_VS_RAW,
                ">=",
                f"core 1000/msg {sink} vs B",
            )
        if not core and per_msg == 1:
            twin = by_name.get(s["name"].replace("jetstream-", "core-", 1))
            rate, twin_rate = _get(s, "service", "rows_per_s"), _get(twin, "service", "rows_per_s")
            add(
                s["name"],
                "rows_per_s_vs_core",
                rate / twin_rate if rate and twin_rate else None,
                TARGET_JS_SINGLE_VS_CORE,
                ">=",
                "JS 1/msg vs core",
            )
        if not core and per_msg == 1000:
            add(
                s["name"],
                "service_vs_raw_sink",
                ratios.get("service_vs_raw_sink"),
                TARGET_JS_BATCH_VS_RAW,
                ">=",
                "JS 1000/msg vs B",
            )
    for s in _matrix(report["scenarios"]):
        if s.get("replicas", 1) > 1:
            continue
        phase = latency_at(s, TARGET_P99_AT_FRACTION)
        goal = TARGET_P99_MS if s["sink"] == "sqlite" else TARGET_P99_PG_MS
        add(
            s["name"],
            "latency_p99_ms_at_50pct",
            None if phase is None else phase.get("p99_ms"),
            goal,
            "<=",
            "p99 @50% (ms)",
        )
    for s in report["scenarios"]:
        if s.get("group") == "rss" and "rss_full_queue" in s:
            add(
                s["name"],
                "peak_rss_mb_full_queue",
                s["rss_full_queue"].get("peak_rss_mb_full"),
                TARGET_RSS_MB,
                "<=",
                "RSS full queue (MB)",
            )
    for s in _mixed(report["scenarios"]):
        add(
            s["name"],
            "ingest_with_queries_vs_alone",
            s["ratios"].get("with_queries_vs_alone"),
            TARGET_MIXED_RATIO,
            ">=",
            "ingest w/ queries vs alone",
        )
    return out


# ----------------------------------------------------------------------- tables


def _table(
    title: str,
    rows: Iterable[dict[str, Any]],
    columns: list[tuple[str, Callable[[dict[str, Any]], str], str]],
) -> None:
    """Print a table: ``columns`` are (header, cell function, ``<`` or ``>`` align)."""
    body = [[fn(r) for _, fn, _ in columns] for r in rows]
    if not body:
        return
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (h, _, _) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if align == "<" else c.rjust(w)
            for c, w, (_, _, align) in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    head = line([h for h, _, _ in columns])
    _say(title)
    print(head)
    print("-" * len(head))
    for b in body:
        print(line(b))
    print()


def _say(text: str) -> None:
    """Print ``text`` wrapped to 118 columns (continuation lines indented)."""
    print(textwrap.fill(text, width=118, subsequent_indent="    ", break_on_hyphens=False))


def _feedback_cell(s: dict[str, Any]) -> str:
    fb = _get(s, "service", "feedback")
    if not isinstance(fb, dict):
        return "-"
    return f"{fb.get('ok', 0)}/{fb.get('soft', 0)}/{fb.get('hard', 0)}"


def print_report(report: dict[str, Any]) -> None:
    """The human-readable summary: throughput, latency, extras, targets, failures."""
    scenarios = report["scenarios"]
    matrix = _matrix(scenarios)
    _table(
        "Throughput (committed rows/s; A = bare subscriber records/s, B = raw sink insert "
        "rows/s; feedback events ok/soft/hard)",
        matrix,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("records", lambda s: fmt(_get(s, "service", "published_records"), ",d"), ">"),
            ("rows/s", lambda s: fmt(_get(s, "service", "rows_per_s"), ",.0f"), ">"),
            ("A rec/s", lambda s: fmt(_get(s, "ceilings", "A_records_per_s"), ",.0f"), ">"),
            ("/A", lambda s: fmt(_get(s, "ratios", "service_vs_bare_subscriber"), ".2f"), ">"),
            ("B rows/s", lambda s: fmt(_get(s, "ceilings", "B_rows_per_s"), ",.0f"), ">"),
            ("/B", lambda s: fmt(_get(s, "ratios", "service_vs_raw_sink"), ".2f"), ">"),
            ("feedback", _feedback_cell, ">"),
            ("RSS MB", lambda s: fmt(_get(s, "service", "peak_rss_mb"), ".0f"), ">"),
            ("lost", lambda s: fmt(_get(s, "service", "lost_total"), ",d"), ">"),
        ],
    )

    def cpu(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: fmt(_get(s, "service", "cpu_us_per_record", key), ".1f")

    _table(
        "CPU µs per stored record in the throughput phase, by process (service: main + "
        "writer + readers); A: the bare subscriber's µs per message; B: raw insert µs "
        "per row (PostgreSQL: client + server); CPU ratios: the service's over A (per "
        "message) and over B (per row; PostgreSQL: with the server)",
        matrix,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("main", cpu("main"), ">"),
            ("writer", cpu("writer"), ">"),
            ("readers", cpu("reader"), ">"),
            ("service", cpu("service"), ">"),
            ("nats-server", cpu("nats_server"), ">"),
            ("postgresql", cpu("postgresql"), ">"),
            ("A µs/msg", lambda s: fmt(_get(s, "ceilings", "A_cpu_us_per_msg"), ".1f"), ">"),
            ("B µs/row", lambda s: fmt(_get(s, "ceilings", "B_cpu_us_per_row"), ".1f"), ">"),
            ("CPU/A", lambda s: fmt(_get(s, "ratios", "cpu_vs_bare_subscriber"), ".2f"), ">"),
            ("CPU/B", lambda s: fmt(_get(s, "ratios", "cpu_vs_raw_sink"), ".2f"), ">"),
        ],
    )

    def lat(fraction: float, key: str, spec: str) -> Callable[[dict[str, Any]], str]:
        def cell(s: dict[str, Any]) -> str:
            phase = latency_at(s, fraction)
            return "-" if phase is None else fmt(phase.get(key), spec)

        return cell

    _table(
        "Latency, publish→commit in ms (core: reply to a sampled request; JetStream: the "
        "service's ack), at 50 % and 90 % of each scenario's maximum",
        matrix,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("50%: rows/s", lat(0.5, "achieved_rows_per_s", ",.0f"), ">"),
            ("p50", lat(0.5, "p50_ms", ".1f"), ">"),
            ("p95", lat(0.5, "p95_ms", ".1f"), ">"),
            ("p99", lat(0.5, "p99_ms", ".1f"), ">"),
            ("90%: rows/s", lat(0.9, "achieved_rows_per_s", ",.0f"), ">"),
            ("p50", lat(0.9, "p50_ms", ".1f"), ">"),
            ("p95", lat(0.9, "p95_ms", ".1f"), ">"),
            ("p99", lat(0.9, "p99_ms", ".1f"), ">"),
        ],
    )
    refused = [
        f"{s['name']} {_get(s, 'service', 'refused_total'):,}"
        for s in matrix
        if _get(s, "service", "refused_total")
    ]
    if refused:
        _say(
            "Records refused with an error reply (e.g. 503 at the hard mark; counted apart "
            "from lost): " + ", ".join(refused)
        )
        print()
    for s in scenarios:
        if s.get("r1_scenario"):
            p99 = s.get("p99_ms_at_50pct") or {}
            _say(
                f"{s['name']}: JetStream R{s['replicas']} on a {s['replicas']}-node cluster, "
                f"{fmt(_get(s, 'service', 'rows_per_s'), ',.0f')} rows/s = "
                f"{fmt(_get(s, 'ratios', 'rows_per_s_vs_r1'), '.2f')} x {s['r1_scenario']} (R1, "
                f"one server); p99 at 50 % {fmt(p99.get('r3'), '.1f')} ms against "
                f"{fmt(p99.get('r1'), '.1f')} ms"
            )
        if s.get("group") == "scaleout" and "service" in s:
            twin = s.get("single_instance_scenario")
            ratio = _get(s, "ratios", "service_vs_single_instance")
            per = _get(s, "service", "peak_rss_mb_per_instance") or []
            _say(
                f"{s['name']}: {s['instances']} instances, "
                f"{fmt(_get(s, 'service', 'rows_per_s'), ',.0f')} rows/s aggregate = "
                f"{fmt(ratio, '.2f')} x {twin} "
                f"({fmt(_get(s, 'single_instance_rows_per_s'), ',.0f')} rows/s); "
                f"peak RSS per instance {', '.join(f'{m:.0f}' for m in per) or '-'} MB"
            )
        if s.get("group") == "rss" and "rss_full_queue" in s:
            r = s["rss_full_queue"]
            _say(
                f"{s['name']}: {r['published_records']:,} records published "
                f"({r['records_per_msg']}/msg) with commits blocked; hard feedback after "
                f"{fmt(r.get('published_records_at_hard'), ',d')} records; queue "
                f"{fmt(r.get('queue_depth_full'), ',d')}/{r['capacity']:,} "
                f"(+{fmt(r.get('in_flight_full'), ',d')} in flight); service tree RSS "
                f"{fmt(r.get('rss_mb_full'), '.0f')} MB (peak "
                f"{fmt(r.get('peak_rss_mb_full'), '.0f')} MB; {fmt(r.get('rss_mb_idle'), '.0f')}"
                f" MB idle); after release all stored in "
                f"{fmt(r.get('store_after_release_s'), '.1f')} s, lost {r.get('lost')}"
            )
    if any(s.get("group") in ("scaleout", "rss") or s.get("r1_scenario") for s in scenarios):
        print()
    _print_mixed(_mixed(scenarios), bool(matrix))
    _table(
        "Targets (information only: a missed target never fails the run)",
        report.get("targets", []),
        [
            ("target", lambda t: t["target"], "<"),
            ("scenario", lambda t: t["scenario"], "<"),
            ("value", lambda t: fmt(t["value"], ".3f"), ">"),
            ("goal", lambda t: f"{t['op']} {t['threshold']:g}", ">"),
            ("verdict", lambda t: "met" if t["met"] else "MISSED", "<"),
            ("margin", lambda t: fmt(t["margin"], "+.3f"), ">"),
        ],
    )
    for s in scenarios:
        for note in s.get("notes") or []:
            _say(f"note: {s['name']}: {note}")
    met = sum(1 for t in report.get("targets", []) if t["met"])
    print(f"targets met: {met} of {len(report.get('targets', []))}")
    failures = report.get("failures") or []
    if failures:
        print("\nFAILURES (exit code 1):")
        for f in failures:
            print(f"  {f}")


def _print_mixed(mixed: list[dict[str, Any]], charted: bool) -> None:
    """The mixed-load tables: ingest with and without queries, and the query figures."""
    if not mixed:
        return

    def rate(phase: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: fmt(_get(s, "rows_per_s", phase), ",.0f")

    _table(
        "Ingest with a concurrent query load (core, 100 trades/msg, committed rows/s on "
        "fresh records; a and c alone, b with the paced query load; ratio = b / mean(a, c))",
        mixed,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("records/phase", lambda s: fmt(_get(s, "query_range", "records"), ",d"), ">"),
            ("a rows/s", rate("a_alone"), ">"),
            ("b rows/s", rate("b_with_queries"), ">"),
            ("c rows/s", rate("c_alone"), ">"),
            ("b/mean(a,c)", lambda s: fmt(_get(s, "ratios", "with_queries_vs_alone"), ".2f"), ">"),
            ("c/a", lambda s: fmt(_get(s, "ratios", "c_vs_a"), ".2f"), ">"),
            ("RSS MB", lambda s: fmt(_get(s, "service", "peak_rss_mb"), ".0f"), ">"),
            ("lost", lambda s: fmt(_get(s, "service", "lost_total"), ",d"), ">"),
        ],
    )

    def q(section: str, endpoint: str, key: str, spec: str) -> Callable[[dict[str, Any]], str]:
        return lambda s: fmt(_get(s, section, endpoint, key), spec)

    def asked(section: str, endpoint: str) -> Callable[[dict[str, Any]], str]:
        def cell(s: dict[str, Any]) -> str:
            value = _get(s, section, endpoint, "rate_asked_per_s")
            return value if isinstance(value, str) else fmt(value, "g")

        return cell

    def errors(section: str) -> Callable[[dict[str, Any]], str]:
        def cell(s: dict[str, Any]) -> str:
            total: dict[str, int] = {}
            for endpoint in ("query", "latest"):
                for code, n in (_get(s, section, endpoint, "errors") or {}).items():
                    total[code] = total.get(code, 0) + n
            return ",".join(f"{c}:{n}" for c, n in sorted(total.items())) or "0"

        return cell

    _table(
        "Query load during b (paced; pages of 1000 trades following next_cursor; latest of "
        "10 symbols; latency in ms, request to reply)",
        mixed,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("pages/s asked", asked("query_load", "query"), ">"),
            ("got", q("query_load", "query", "ok_per_s", ".1f"), ">"),
            ("p50", q("query_load", "query", "p50_ms", ".1f"), ">"),
            ("p95", q("query_load", "query", "p95_ms", ".1f"), ">"),
            ("p99", q("query_load", "query", "p99_ms", ".1f"), ">"),
            ("latest/s asked", asked("query_load", "latest"), ">"),
            ("got", q("query_load", "latest", "ok_per_s", ".1f"), ">"),
            ("p50", q("query_load", "latest", "p50_ms", ".1f"), ">"),
            ("p95", q("query_load", "latest", "p95_ms", ".1f"), ">"),
            ("p99", q("query_load", "latest", "p99_ms", ".1f"), ">"),
            ("records/s", q("query_load", "query", "records_per_s", ",.0f"), ">"),
            ("errors", errors("query_load"), ">"),
        ],
    )
    _table(
        "Queries alone (no ingest; closed loop: each page worker asks again as soon as "
        "its reply is in; pages of 1000 trades): the read path's maximum",
        mixed,
        [
            ("scenario", lambda s: s["name"], "<"),
            ("seconds", lambda s: fmt(_get(s, "queries_alone", "seconds"), ".1f"), ">"),
            ("in flight", lambda s: fmt(_get(s, "queries_alone", "max_in_flight"), "d"), ">"),
            ("pages/s", q("queries_alone", "query", "ok_per_s", ",.1f"), ">"),
            ("records/s", q("queries_alone", "query", "records_per_s", ",.0f"), ">"),
            ("p50", q("queries_alone", "query", "p50_ms", ".1f"), ">"),
            ("p95", q("queries_alone", "query", "p95_ms", ".1f"), ">"),
            ("p99", q("queries_alone", "query", "p99_ms", ".1f"), ">"),
            ("errors", errors("queries_alone"), ">"),
        ],
    )
    rows: list[dict[str, Any]] = []
    for s in mixed:
        parts = [
            ("a", _get(s, "phases", "a_alone")),
            ("b", _get(s, "phases", "b_with_queries")),
            ("c", _get(s, "phases", "c_alone")),
            ("queries alone", s.get("queries_alone")),
        ]
        rows.extend({"name": s["name"], "phase": label, **(part or {})} for label, part in parts)

    def cpu(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(_get(r, "cpu", "cpu_s", name), ".2f")

    _table(
        "CPU seconds per phase (process trees; load generators: the benchmark's publishers "
        "and query client, process start included; cores busy = total / wall seconds)",
        rows,
        [
            ("scenario", lambda r: r["name"], "<"),
            ("phase", lambda r: r["phase"], "<"),
            ("wall s", lambda r: fmt(r.get("wall_s"), ".1f"), ">"),
            ("service", cpu("service"), ">"),
            ("nats-server", cpu("nats_server"), ">"),
            ("postgresql", cpu("postgresql"), ">"),
            ("load gen.", cpu("load_generators"), ">"),
            ("total", lambda r: fmt(_get(r, "cpu", "total_cpu_s"), ".2f"), ">"),
            ("cores busy", lambda r: fmt(_get(r, "cpu", "cores_busy"), ".2f"), ">"),
        ],
    )
    if charted:
        _say(
            "The mixed-query-* scenarios are not in throughput.png (three phases each; see above)."
        )
        print()


# ----------------------------------------------------------------------- charts


_MODE_COLOURS = {"core": "tab:blue", "jetstream": "tab:orange"}


def write_charts(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``throughput.png``, ``latency.png`` and ``cpu.png`` in ``out_dir`` (matplotlib, Agg).

    Returns:
        The files written (none when no scenario measured throughput).
    """
    matrix = _matrix(report["scenarios"])
    if not matrix:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [
        _throughput_chart(plt, matrix, out_dir / "throughput.png", report),
        _latency_chart(plt, matrix, out_dir / "latency.png", report),
        _cpu_chart(plt, matrix, out_dir / "cpu.png", report),
    ]
    return written


def _subtitle(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    return (
        f"{report.get('preset', '?')} preset, {report.get('when', '')}, "
        f"{m.get('usable_cpus', '?')} CPUs, {m.get('cpu', '')}"
    )


def _throughput_chart(plt: Any, matrix: list[dict[str, Any]], path: Path, report: Any) -> Path:
    names = [s["name"] for s in matrix]
    y = list(range(len(matrix)))[::-1]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(matrix)))
    service = [_get(s, "service", "rows_per_s") or 0.0 for s in matrix]
    colours = [_MODE_COLOURS.get(s["mode"], "grey") for s in matrix]
    ax.barh(y, service, color=colours, height=0.6)
    a = [_get(s, "ceilings", "A_records_per_s") for s in matrix]
    b = [_get(s, "ceilings", "B_rows_per_s") for s in matrix]
    ax.scatter(
        [v for v in a if v],
        [yy for yy, v in zip(y, a, strict=True) if v],
        marker="^",
        color="black",
        zorder=3,
    )
    ax.scatter(
        [v for v in b if v],
        [yy for yy, v in zip(y, b, strict=True) if v],
        marker="o",
        facecolors="none",
        edgecolors="crimson",
        zorder=3,
    )
    for yy, v in zip(y, service, strict=True):
        if v:
            ax.text(v, yy, f" {v:,.0f}", va="center", fontsize=7)
    values = [v for v in (*service, *a, *b) if v]
    if values:
        ax.set_xlim(min(values) / 4, max(values) * 2.5)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("rows/s (log scale)")
    ax.set_title(f"store-svc ingest throughput vs ceilings\n{_subtitle(report)}", fontsize=10)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        *(
            Patch(color=c, label=f"service, {m} (committed rows/s)")
            for m, c in _MODE_COLOURS.items()
        ),
        Line2D([], [], marker="^", color="black", linestyle="none", label="A: bare subscriber"),
        Line2D(
            [],
            [],
            marker="o",
            markerfacecolor="none",
            markeredgecolor="crimson",
            linestyle="none",
            label="B: raw sink insert",
        ),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


_CPU_PARTS = (
    ("main", "tab:blue"),
    ("writer", "tab:green"),
    ("reader", "tab:olive"),
    ("other", "tab:purple"),
)


def _cpu_chart(plt: Any, matrix: list[dict[str, Any]], path: Path, report: Any) -> Path:
    """CPU µs per stored record by process, with ceiling A's µs per record (its µs per
    message over the records per message) and ceiling B's µs per row."""
    names = [s["name"] for s in matrix]
    y = list(range(len(matrix)))[::-1]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(matrix)))
    left = [0.0] * len(matrix)
    for part, colour in _CPU_PARTS:
        widths = [_get(s, "service", "cpu_us_per_record", part) or 0.0 for s in matrix]
        ax.barh(y, widths, left=left, color=colour, height=0.6, label=f"service {part}")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    extra = [
        (_get(s, "service", "cpu_us_per_record", "nats_server") or 0.0)
        + (_get(s, "service", "cpu_us_per_record", "postgresql") or 0.0)
        for s in matrix
    ]
    ax.barh(y, extra, left=left, color="lightgrey", height=0.6, label="nats-server + PostgreSQL")
    a = [(_get(s, "ceilings", "A_cpu_us_per_msg") or 0.0) / s["records_per_msg"] for s in matrix]
    b = [_get(s, "ceilings", "B_cpu_us_per_row") or 0.0 for s in matrix]
    ax.scatter(a, y, marker="^", color="black", zorder=3, label="A: bare subscriber, per record")
    ax.scatter(
        b,
        y,
        marker="o",
        facecolors="none",
        edgecolors="crimson",
        zorder=3,
        label="B: raw insert, per row",
    )
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("CPU µs per stored record (log scale)")
    ax.set_title(f"store-svc CPU per record vs ceilings\n{_subtitle(report)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _latency_chart(plt: Any, matrix: list[dict[str, Any]], path: Path, report: Any) -> Path:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ncols = 6 if len(matrix) > 8 else max(1, min(4, len(matrix)))
    nrows = math.ceil(len(matrix) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows + 0.8), squeeze=False)
    for ax in axes.flat[len(matrix) :]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, matrix, strict=False):
        phases = sorted(s.get("latency") or [], key=lambda p: p.get("fraction_of_max", 0))
        x = [p.get("achieved_rows_per_s") or math.nan for p in phases]
        colour = _MODE_COLOURS.get(s["mode"], "grey")
        for key, style, label in (("p50_ms", "o--", "p50"), ("p99_ms", "s-", "p99")):
            ys = [p.get(key) if p.get(key) is not None else math.nan for p in phases]
            ax.plot(x, ys, style, color=colour, label=label, markersize=4)
        for p, xx in zip(phases, x, strict=True):
            if p.get("p99_ms") is not None and not math.isnan(xx):
                ax.annotate(
                    f"{p['fraction_of_max']:.0%}",
                    (xx, p["p99_ms"]),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(2, 3),
                )
        ax.axhline(TARGET_P99_MS, color="crimson", linewidth=0.8, linestyle=":")
        ax.set_title(s["name"], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("offered rows/s", fontsize=6)
        ax.set_ylabel("ms", fontsize=6)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(
        "publish→commit latency at 50 % and 90 % of each scenario's maximum\n"
        f"p50 dashed, p99 solid; dotted: the {TARGET_P99_MS:g} ms p99 target; "
        f"{_subtitle(report)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
