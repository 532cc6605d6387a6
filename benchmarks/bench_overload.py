"""Health under a flood: each ingest mode flooded flat out, health probed every 50 ms.

Run: ``.venv/bin/python benchmarks/bench_overload.py`` (``--quick`` for a smoke run).

For each scenario (core and JetStream mode, on an idle machine and with a second
process burning one core) a fresh ``store-svc run`` (SQLite, defaults) is flooded with
unique single-trade writes by a publisher process while this process asks
``mdp.store.health`` every 50 ms (1 s timeout). Reported per scenario:

* health latency p50 / p99 / max during the flood (from the first publish until every
  record is accounted for), against the same service idle before and after it, in
  the same run (the ratio is what compares across machines);
* probes missed (no answer within 1 s);
* the accounting: published, committed, dropped as a slow consumer, refused at hard,
  and what is left unaccounted (must be 0);
* CPU: service process tree and nats-server, and the service's CPU per record stored.

Goal: health p99 <= 20 ms and max <= 100 ms during the flood. A table is printed and
the JSON written to ``benchmarks/results/overload-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ingest_infra import git_state, machine_info
from benchmarks.ingest_roles import CORE, JETSTREAM
from benchmarks.overload import FloodConfig, make_trades, run_flood
from store_svc.devtools.natsserver import NatsServer

GOAL_P99_MS = 20.0
GOAL_MAX_MS = 100.0


def scenarios(messages: int, quick: bool) -> list[tuple[str, FloodConfig]]:
    """The (name, flood) pairs of a run."""
    out = []
    for mode in (CORE, JETSTREAM):
        for burn in (False, True) if not quick else (True,):
            name = f"{mode}-{'busy' if burn else 'idle'}"
            out.append((name, FloodConfig(mode=mode, messages=messages, burn_s=600 if burn else 0)))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every scenario; return the report."""
    messages = args.messages or (50_000 if args.quick else 300_000)
    payloads = make_trades(messages + 1, 1)
    report: dict[str, Any] = {
        "benchmark": "overload",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "git": git_state(),
        "goal": {"health_p99_ms": GOAL_P99_MS, "health_max_ms": GOAL_MAX_MS},
        "scenarios": {},
    }
    for name, cfg in scenarios(messages, args.quick):
        with tempfile.TemporaryDirectory(prefix=f"overload-{name}-") as tmp:
            work = Path(tmp)
            js = work / "jetstream" if cfg.mode == JETSTREAM else None
            with NatsServer(store_dir=js) as server:
                assert server.proc is not None
                print(f"{name}: {cfg.messages:,} writes flat out ...", flush=True)
                res = run_flood(work, server.url, server.proc.pid, cfg, payloads)
        out = res.as_dict()
        idle_p99 = out["health_ms_idle"]["p99"]
        out["p99_vs_idle"] = round(out["health_ms"]["p99"] / idle_p99, 2) if idle_p99 else None
        report["scenarios"][name] = out
    return report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any]) -> None:
    """The human-readable summary."""
    head = (
        f"{'scenario':<16}{'p50':>7}{'p99':>7}{'max':>7}{'idle p99':>9}{'missed':>7}"
        f"{'published':>10}{'committed':>10}{'dropped':>9}{'refused':>8}{'lost':>6}"
        f"{'µs/rec':>8}{'lag max':>8}  goal"
    )
    print(head)
    for name, s in report["scenarios"].items():
        h = s["health_ms"]
        met = (h["p99"] or 1e9) <= GOAL_P99_MS and (h["max"] or 1e9) <= GOAL_MAX_MS
        print(
            f"{name:<16}{_ms(h['p50']):>7}{_ms(h['p99']):>7}{_ms(h['max']):>7}"
            f"{_ms(s['health_ms_idle']['p99']):>9}{s['probe_missed']:>7}"
            f"{s['published_records']:>10}{s['committed']:>10}{s['dropped_msgs']:>9}"
            f"{s['refused_msgs']:>8}{s['unaccounted']:>6}"
            f"{_ms(s['service_cpu_us_per_record']):>8}{_ms(s['loop_lag_ms_max']):>8}"
            f"  {'met' if met else 'missed'}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small floods, busy machine only")
    parser.add_argument("--messages", type=int, default=0, help="writes per flood")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results", help="JSON folder"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overload-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"report: {path}")
    lost = sum(s["unaccounted"] for s in report["scenarios"].values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
