"""CPU per record: what each process of a scenario, and each ceiling, spends per record.

Wall-clock rates on a shared machine swing run to run and mix the service's cost with
the publishers' and nats-server's; CPU seconds per record, read from ``/proc`` (psutil)
for each process, do not. :class:`ProcessCpu` reads the user + system CPU seconds of
named processes: the service's main process and each of its children by role (the
SQLite ``writer``, the ``reader`` processes), nats-server, and the PostgreSQL server's
whole tree (its backends included, and the children it has reaped). Two readings
around a phase give CPU seconds per role; divided by the records of the phase, µs
per record.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

#: The role of a service child process, by what its command line holds.
_CHILD_ROLES = (("--read", "reader"), ("sqlite_worker", "writer"))


def _cpu(p: psutil.Process, reaped: bool = False) -> float:
    """CPU seconds of ``p`` (with ``reaped``: and of the children it has reaped).

    The kernel's scheduler statistics (``/proc/<pid>/task/*/schedstat``, nanoseconds)
    where it has them, as the clock ticks of ``cpu_times`` (10 ms) are too coarse for
    a short phase; the reaped children only exist in ticks.
    """
    t = p.cpu_times()
    used = _schedstat_seconds(p.pid)
    if used is None:
        used = t.user + t.system
    return used + t.children_user + t.children_system if reaped else used


def _schedstat_seconds(pid: int) -> float | None:
    """The on-CPU time of every live thread of ``pid``, or None where unavailable."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError):
        return None
    return total / 1e9


def _role(p: psutil.Process) -> str:
    with suppress(psutil.Error):
        line = " ".join(p.cmdline())
        for needle, role in _CHILD_ROLES:
            if needle in line:
                return role
    return "other"


class ProcessCpu:
    """CPU seconds of the service's processes by role, and of other named process trees.

    Args:
        service_pids: the main process of each service instance.
        trees: other processes by name (``nats_server``, ``postgresql``), each counted
            with its descendants and what they reaped; a list of pids is summed (the
            nodes of a NATS cluster).
    """

    def __init__(
        self, service_pids: list[int], trees: dict[str, int | list[int]] | None = None
    ) -> None:
        self.service_pids = list(service_pids)
        self.trees = dict(trees or {})

    def read(self) -> dict[str, float]:
        """CPU seconds used so far: ``main``, ``writer``, ``reader``, ``other`` (summed
        over the instances) and each named tree.

        A child that exited since the last reading (a restarted writer) takes its
        seconds with it; the seconds its parent reaped are not counted twice because
        the main process is read without its reaped children.
        """
        out: dict[str, float] = {"main": 0.0, "writer": 0.0, "reader": 0.0, "other": 0.0}
        for pid in self.service_pids:
            with suppress(psutil.Error):
                root = psutil.Process(pid)
                out["main"] += _cpu(root)
                for child in root.children(recursive=True):
                    with suppress(psutil.Error):
                        out[_role(child)] += _cpu(child)
        for name, pids in self.trees.items():
            out[name] = tree_seconds(pids)
        return out

    @staticmethod
    def per_record(
        before: dict[str, float], after: dict[str, float], records: int
    ) -> dict[str, Any]:
        """µs per record by role between two readings, with the service's total
        (``service``: main + writer + readers + other) and the records counted."""
        if records <= 0:
            return {"records": records}
        used = {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}
        out: dict[str, Any] = {k: round(v / records * 1e6, 3) for k, v in used.items()}
        service = sum(used[k] for k in ("main", "writer", "reader", "other") if k in used)
        out["service"] = round(service / records * 1e6, 3)
        out["records"] = records
        out["cpu_s"] = {k: round(v, 3) for k, v in used.items()}
        return out


def tree_seconds(pid: int | list[int]) -> float:
    """CPU seconds of a process (or the sum over several), its live descendants and
    what each of them reaped."""
    if isinstance(pid, list):
        return sum(tree_seconds(p) for p in pid)
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        with suppress(psutil.Error):
            total += _cpu(p, reaped=True)
    return total


def process_seconds(pid: int) -> float:
    """CPU seconds of one process (0 when it is gone)."""
    try:
        return _cpu(psutil.Process(pid))
    except psutil.Error:
        return 0.0
