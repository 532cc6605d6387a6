"""Summarise a py-spy speedscope profile (``bench_ingest.py --py-spy``) as text.

For each sampled process and thread: the seconds sampled (py-spy leaves idle time
out), then the functions with the most time *in themselves* (self) and the most
time *below them* (total, each function counted once per sample), as shares of
the thread's samples.

    .venv/bin/python benchmarks/profile_summary.py results/*.speedscope.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def _label(frame: dict[str, Any]) -> str:
    path = Path(frame.get("file") or "?")
    parts = path.parts
    # Keep the package-relative part: store_svc/..., nats/..., asyncio/...
    for anchor in ("store_svc", "site-packages", "python3.11", "python3.12", "python3.13"):
        if anchor in parts:
            i = parts.index(anchor)
            path = Path(*parts[i + (0 if anchor == "store_svc" else 1) :])
            break
    return f"{frame['name']} ({path})"


def summarise(doc: dict[str, Any], top: int, min_seconds: float) -> list[str]:
    """The text lines of the summary of one speedscope document."""
    frames = doc["shared"]["frames"]
    lines: list[str] = []
    for profile in doc["profiles"]:
        weights = profile["weights"]
        seconds = float(sum(weights))
        if seconds < min_seconds:
            continue
        # py-spy names a frame per line; a function's lines count as one.
        labels = [_label(f) for f in frames]
        own: Counter[str] = Counter()
        below: Counter[str] = Counter()
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if stack:
                own[labels[stack[-1]]] += weight
            for label in {labels[i] for i in stack}:
                below[label] += weight
        # Frames under every sample (the process, main, the loop's run) say nothing.
        below = Counter({k: v for k, v in below.items() if v < 0.995 * seconds})
        lines.append(f"{profile['name']}: {seconds:.2f} s sampled")
        for title, counts in (("self", own), ("total", below)):
            lines.append(f"  by {title}:")
            for label, weight in counts.most_common(top):
                lines.append(f"    {100 * weight / seconds:5.1f} %  {label}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="speedscope JSON files")
    parser.add_argument("--top", type=int, default=12, help="functions per list")
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="leave out threads sampled for less"
    )
    args = parser.parse_args()
    for path in args.profiles:
        print(f"== {path.name}")
        print("\n".join(summarise(json.loads(path.read_text()), args.top, args.min_seconds)))


if __name__ == "__main__":
    main()
