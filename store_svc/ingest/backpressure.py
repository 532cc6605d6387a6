"""Backpressure levels from queue depth: watermarks with hysteresis and a minimum dwell.

Pure logic, no I/O: :class:`Watermarks` is fed the queue depth and a clock reading
and says which level changes happen. The rules:

* Going **up** is immediate: ``ok → soft`` when the depth reaches the soft mark,
  ``→ hard`` when it reaches the hard mark (``ok → hard`` passes through ``soft``,
  so every step is announced).
* Going **down** needs the depth below the level's *recovery* mark (lower than the
  mark that raised it: hysteresis) **and** the level held for at least the minimum
  dwell time, and it goes one step at a time: ``hard → soft → ok``.

So a depth that oscillates around a mark produces one change, not one per crossing.
While :attr:`Watermarks.forced` is set (the database is failing commits) the level
goes to ``hard`` at once, through ``soft``, and stays there; when it is cleared the
usual rules bring it down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from store_svc.core import BackpressureLevel

__all__ = ["Marks", "Pressure", "Watermarks"]

OK = BackpressureLevel.ok
SOFT = BackpressureLevel.soft
HARD = BackpressureLevel.hard


class Pressure(Protocol):
    """What intake reads and reports of the backpressure state (the feedback loop,
    ``control/feedback.py``, implements it)."""

    @property
    def level(self) -> BackpressureLevel:
        """The current level."""
        ...

    def on_backlog(self, records: int) -> None:
        """Take a new estimate of the records waiting in the NATS client."""
        ...


@dataclass(frozen=True)
class Marks:
    """Queue depths (in records) at which the level changes.

    Attributes:
        soft: depth at which ``ok`` becomes ``soft``.
        hard: depth at which ``soft`` becomes ``hard``.
        soft_recovery: below this depth ``soft`` may fall back to ``ok``.
        hard_recovery: below this depth ``hard`` may fall back to ``soft``.
    """

    soft: int
    hard: int
    soft_recovery: int
    hard_recovery: int

    @classmethod
    def from_fractions(
        cls, capacity: int, soft: float, hard: float, soft_recovery: float, hard_recovery: float
    ) -> Marks:
        """Marks from fractions of the queue capacity.

        Args:
            capacity: queue capacity in records.
            soft: soft mark as a fraction of capacity.
            hard: hard mark as a fraction of capacity.
            soft_recovery: soft recovery mark as a fraction of capacity.
            hard_recovery: hard recovery mark as a fraction of capacity.

        Returns:
            The marks, in records (each at least 1).
        """

        def depth(fraction: float) -> int:
            return max(1, round(capacity * fraction))

        return cls(depth(soft), depth(hard), depth(soft_recovery), depth(hard_recovery))


class Watermarks:
    """The level state machine.

    Args:
        marks: the depths of the marks.
        min_dwell: seconds a level must be held before it may go down.
        now: clock reading at creation (the ``ok`` level starts then).
    """

    def __init__(self, marks: Marks, min_dwell: float, now: float) -> None:
        self.marks = marks
        self.min_dwell = min_dwell
        self.level = OK
        self.since = now
        #: While set (the database is failing), the level is ``hard`` whatever the depth.
        self.forced = False

    def update(self, depth: int, now: float) -> list[BackpressureLevel]:
        """Apply a depth reading.

        Args:
            depth: records in the queue.
            now: clock reading (seconds, monotonic).

        Returns:
            The new levels entered, in order (empty when nothing changed).
        """
        changes: list[BackpressureLevel] = []
        m = self.marks
        while True:
            target = self._step(depth, now, m)
            if target is None:
                return changes
            self.level = target
            self.since = now
            changes.append(target)

    def _step(self, depth: int, now: float, m: Marks) -> BackpressureLevel | None:
        level = self.level
        if self.forced:
            return None if level is HARD else (SOFT if level is OK else HARD)
        if level is OK:
            return SOFT if depth >= m.soft else None
        if level is SOFT:
            if depth >= m.hard:
                return HARD
            if depth < m.soft_recovery and now - self.since >= self.min_dwell:
                return OK
            return None
        if depth < m.hard_recovery and now - self.since >= self.min_dwell:
            return SOFT
        return None

    def due(self, depth: int) -> float | None:
        """When a downward change held back only by the dwell becomes due.

        Args:
            depth: the current depth.

        Returns:
            The clock reading at which to call :meth:`update` again, or None.
        """
        level = self.level
        m = self.marks
        if (level is SOFT and depth < m.soft_recovery) or (
            level is HARD and depth < m.hard_recovery
        ):
            return self.since + self.min_dwell
        return None
