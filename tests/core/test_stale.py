"""Stale statistics: fixed and callable intervals, SP-NGD's adaptive rule, counts, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hvd_ngd.config import KFACConfig
from hvd_ngd.ops import NumpyOps
from hvd_ngd.engine.curvature import relative_change as relative_change_tensor
from hvd_ngd.stale import StalenessTracker


def relative_change(ops, new, previous):
    """The engine's on-device relative change, read back (inf without a previous value)."""
    return math.inf if previous is None else float(relative_change_tensor(ops, new, previous))

OPS = NumpyOps()


def test_relative_change() -> None:
    assert relative_change(OPS, np.ones(2), None) == math.inf
    assert math.isclose(relative_change(OPS, np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])), 0.1)
    assert relative_change(OPS, np.zeros(2), np.zeros(2)) == 0.0
    assert relative_change(OPS, np.ones(2), np.zeros(2)) >= 1e30
    x = np.arange(9.0).reshape(3, 3)
    assert math.isclose(relative_change(OPS, x + np.eye(3), x), math.sqrt(3) / np.linalg.norm(x))


def test_fixed_int_and_callable_intervals() -> None:
    tracker = StalenessTracker(KFACConfig(factor_update_interval=3, inv_update_interval=lambda s: 2 if s < 4 else 5), ["x/A", "x/G"])
    due = [tracker.due(s) for s in range(10)]
    assert due == [["x/A", "x/G"] if s % 3 == 0 else [] for s in range(10)]
    inv = [tracker.inverse_due(s, "x/A") for s in range(10)]
    assert inv == [s % (2 if s < 4 else 5) == 0 for s in range(10)]
    counts = tracker.counts
    assert counts.refreshed == 2 * 4 and counts.skipped == 2 * 6
    assert counts.inverse_refreshed == 3 and counts.inverse_skipped == 7  # steps 0, 2, 5
    assert math.isclose(counts.skipped_fraction, 0.6)


def test_fixed_callable_factor_interval_and_step_zero() -> None:
    # Interval 1 while warming up, then 4: due at 0, 1, 2, then multiples of 4.
    tracker = StalenessTracker(KFACConfig(factor_update_interval=lambda s: 1 if s < 3 else 4, inv_update_interval=7), ["a"])
    assert [s for s in range(20) if tracker.due(s)] == [0, 1, 2, 4, 8, 12, 16]
    assert tracker.inverse_due(0, "a")
    tracker.record_refresh("a", 0, 0.0)  # FIXED: only counted, intervals untouched
    assert tracker.intervals() == [1]


def test_bad_callable_interval_names_the_parameter() -> None:
    tracker = StalenessTracker(KFACConfig(factor_update_interval=lambda s: 0), ["a"])
    with pytest.raises(ValueError, match="factor_update_interval"):
        tracker.due(0)


def test_due_counts_once_per_step_and_inverse_once_per_statistic() -> None:
    tracker = StalenessTracker(KFACConfig(factor_update_interval=2, inv_update_interval=2), ["a", "b"])
    assert tracker.due(0) == tracker.due(0) == ["a", "b"]
    assert tracker.inverse_due(0, "a") and tracker.inverse_due(0, "a")
    assert tracker.counts.refreshed == 2 and tracker.counts.skipped == 0
    assert tracker.counts.inverse_refreshed == 1
    assert tracker.due(1) == [] and tracker.counts.skipped == 2


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
    # 0..9 drifting, then 10, 12, 16, 24, 32, 40, 48, 56
    assert refreshed_at[10:] == [10, 12, 16, 24, 32, 40, 48, 56]
    assert counts.refreshed == len(refreshed_at) == 18 and counts.skipped == 60 - 18
    assert counts.inverse_refreshed == 18 and counts.inverse_skipped == 42
    assert math.isclose(counts.skipped_fraction, 42 / 60)


def test_adaptive_shrinks_back_and_rounds() -> None:
    cfg = KFACConfig(interval_policy="adaptive", adaptive_threshold=0.1, adaptive_min_interval=2, adaptive_max_interval=20, adaptive_growth=1.5)
    tracker = StalenessTracker(cfg, ["s", "t"])
    assert tracker.due(0) == ["s", "t"] and tracker.intervals() == [2, 2] and tracker.next_due() == [0, 0]
    history = []
    for change in [0.0] * 6:  # ceil growth: 2 -> 3 -> 5 -> 8 -> 12 -> 18 -> 20 (max)
        tracker.record_refresh("s", 0, change)
        history.append(tracker.intervals()[0])
    assert history == [3, 5, 8, 12, 18, 20]
    for expected in (13, 8, 5, 3, 2, 2):  # floor shrink toward adaptive_min_interval
        tracker.record_refresh("s", 100, 0.5)
        assert tracker.intervals()[0] == expected
    tracker.record_refresh("t", 7, None)  # no previous value: an infinite change
    assert tracker.intervals() == [2, 2] and tracker.next_due() == [102, 9]


def test_owner_decisions_sync_to_other_ranks() -> None:
    cfg = KFACConfig(interval_policy="adaptive", adaptive_max_interval=16)
    owner, other = StalenessTracker(cfg, ["p", "q", "r"]), StalenessTracker(cfg, ["p", "q", "r"])
    for step in range(30):
        for name in owner.due(step):
            owner.record_refresh(name, step, {"p": 0.0, "q": 1.0, "r": 0.01}[name])
        other.set_intervals(owner.intervals())
        other.set_next_due(owner.next_due())
        assert other.due(step + 1) == owner.due(step + 1)
    assert owner.intervals() == [16, 1, 16]
    with pytest.raises(ValueError, match="intervals"):
        other.set_intervals([1, 2])
    with pytest.raises(ValueError, match="next_due"):
        other.set_next_due([0, -1, 0])


def test_state_round_trip() -> None:
    cfg = KFACConfig(interval_policy="adaptive")
    a = StalenessTracker(cfg, ["p", "q"])
    for step in range(5):
        for name in a.due(step):
            a.record_refresh(name, step, 0.0 if name == "p" else 1.0)
    state = json.loads(json.dumps(a.state_dict()))  # plain Python types only
    b = StalenessTracker(cfg, ["p", "q"])
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert b.intervals() == a.intervals() and b.next_due() == a.next_due()
    assert [b.due(s) for s in range(5, 20)] == [a.due(s) for s in range(5, 20)]
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="does not match"):
        StalenessTracker(cfg, ["p", "other"]).load_state_dict(state)


def test_names_are_checked() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        StalenessTracker(KFACConfig(), ["a", "a"])
    tracker = StalenessTracker(KFACConfig(), ["a"])
    with pytest.raises(KeyError, match="unknown statistic"):
        tracker.inverse_due(0, "b")
    with pytest.raises(KeyError, match="unknown statistic"):
        tracker.record_refresh("b", 0, 0.0)
