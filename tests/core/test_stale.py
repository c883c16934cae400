"""Stale statistics: fixed and callable intervals, SP-NGD's adaptive rule, counts, state."""

from __future__ import annotations

import math

import numpy as np

from hvd_ngd.config import KFACConfig
from hvd_ngd.ops import NumpyOps
from hvd_ngd.stale import StalenessTracker, relative_change

OPS = NumpyOps()


def test_relative_change() -> None:
    assert relative_change(OPS, np.ones(2), None) == math.inf
    assert math.isclose(relative_change(OPS, np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])), 0.1)
    assert relative_change(OPS, np.zeros(2), np.zeros(2)) == 0.0


def test_fixed_int_and_callable_intervals() -> None:
    tracker = StalenessTracker(KFACConfig(factor_update_interval=3, inv_update_interval=lambda s: 2 if s < 4 else 5), ["x/A", "x/G"])
    due = [bool(tracker.due(s)) for s in range(10)]
    assert due == [s % 3 == 0 for s in range(10)]
    inv = [tracker.inverse_due(s, "x/A") for s in range(10)]
    assert inv == [s % (2 if s < 4 else 5) == 0 for s in range(10)]
    assert tracker.counts.refreshed == 2 * 4 and tracker.counts.skipped == 2 * 6


def test_adaptive_interval_grows_when_settled_and_stays_small_while_drifting() -> None:
    cfg = KFACConfig(interval_policy="adaptive", adaptive_threshold=0.05, adaptive_min_interval=1, adaptive_max_interval=8)
    tracker = StalenessTracker(cfg, ["s"])
    factor = np.eye(3)
    refreshed_at = []
    for step in range(60):
        due = tracker.due(step)
        # drifting for 10 steps (30% change per refresh), then settled (0.1% change)
        new = factor * (1.3 if step < 10 else 1.001)
        if due:
            assert tracker.inverse_due(step, "s")
            tracker.record_refresh("s", step, relative_change(OPS, new, factor))
            refreshed_at.append(step)
            factor = new
        else:
            assert not tracker.inverse_due(step, "s")
    assert refreshed_at[:10] == list(range(10)), "a drifting statistic is refreshed every step"
    gaps = np.diff(refreshed_at[9:]).tolist()
    assert gaps[:5] == [1, 2, 4, 8, 8] and set(gaps[3:]) == {8}, gaps  # step 9 still drifted
    counts = tracker.counts
    assert counts.refreshed == len(refreshed_at) and counts.skipped == 60 - len(refreshed_at)
    assert 0.5 < counts.skipped_fraction < 1.0


def test_state_round_trip() -> None:
    cfg = KFACConfig(interval_policy="adaptive")
    a = StalenessTracker(cfg, ["p", "q"])
    for step in range(5):
        for name in a.due(step):
            a.record_refresh(name, step, 0.0 if name == "p" else 1.0)
    b = StalenessTracker(cfg, ["p", "q"])
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert [b.due(s) for s in range(5, 20)] == [a.due(s) for s in range(5, 20)]
