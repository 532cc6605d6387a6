"""The level state machine (pure logic, a fake clock)."""

from __future__ import annotations

import pytest

from store_svc.core import BackpressureLevel
from store_svc.ingest.backpressure import Marks, Watermarks

pytestmark = pytest.mark.logic

OK, SOFT, HARD = BackpressureLevel.ok, BackpressureLevel.soft, BackpressureLevel.hard
MARKS = Marks(soft=50, hard=80, soft_recovery=40, hard_recovery=70)


def test_marks_from_fractions() -> None:
    assert Marks.from_fractions(100, 0.5, 0.8, 0.4, 0.7) == MARKS
    assert Marks.from_fractions(3, 0.1, 0.2, 0.05, 0.15).soft == 1


def test_going_up_is_immediate_and_passes_through_soft() -> None:
    wm = Watermarks(MARKS, min_dwell=1.0, now=0.0)
    assert wm.update(49, 0.0) == []
    assert wm.update(50, 0.0) == [SOFT]
    wm = Watermarks(MARKS, min_dwell=1.0, now=0.0)
    assert wm.update(95, 0.0) == [SOFT, HARD]


def test_going_down_needs_the_recovery_mark_and_the_dwell() -> None:
    wm = Watermarks(MARKS, min_dwell=1.0, now=0.0)
    wm.update(90, 0.0)
    assert wm.update(75, 5.0) == [], "above the hard recovery mark"
    assert wm.update(60, 0.5) == [], "held for less than the dwell"
    assert wm.due(60) == 1.0
    assert wm.update(60, 1.0) == [SOFT]
    assert wm.update(0, 1.5) == [], "soft held for less than the dwell"
    assert wm.update(0, 2.0) == [OK]
    assert wm.due(0) is None


def test_hard_to_ok_steps_through_soft() -> None:
    wm = Watermarks(MARKS, min_dwell=0.0, now=0.0)
    wm.update(100, 0.0)
    assert wm.update(0, 1.0) == [SOFT, OK]


def test_oscillation_inside_the_dwell_changes_nothing() -> None:
    wm = Watermarks(MARKS, min_dwell=1.0, now=0.0)
    changes = []
    t = 0.0
    for depth in [49, 51, 39, 52, 38, 50, 35, 55]:
        changes += wm.update(depth, t)
        t += 0.1
    assert changes == [SOFT]


def test_oscillation_between_the_marks_changes_nothing() -> None:
    wm = Watermarks(MARKS, min_dwell=0.0, now=0.0)
    changes = []
    for i, depth in enumerate([55, 45, 55, 45, 79, 41, 60]):
        changes += wm.update(depth, float(i))
    assert changes == [SOFT], "between recovery and mark the level holds"


def test_forced_hard_goes_through_soft_and_holds() -> None:
    wm = Watermarks(MARKS, min_dwell=0.0, now=0.0)
    wm.forced = True
    assert wm.update(0, 0.0) == [SOFT, HARD]
    assert wm.update(0, 5.0) == [], "held while forced"
    wm.forced = False
    assert wm.update(0, 6.0) == [SOFT, OK]
