"""Stale statistics: when each curvature statistic (and its inverse) is refreshed.

A *statistic* is one factor of one layer, named like ``"layer1/A"``, ``"layer1/G"`` or
``"bn1/F"``.

FIXED policy: every statistic is refreshed when ``step % factor_update_interval(step) == 0``
and every inverse when ``step % inv_update_interval(step) == 0`` (each interval an int or a
callable of the step, see ``KFACConfig.resolve_interval``). Step 0 is always due.

ADAPTIVE policy (SP-NGD, NGD_NOTES section 4): each statistic has its own interval, starting at
``adaptive_min_interval``, and its own next due step, starting at 0. After a refresh at step t
the relative Frobenius change ||X_t - X_prev||_F / ||X_prev||_F of the statistic is compared
with ``adaptive_threshold``: below it the interval grows to
``min(adaptive_max_interval, ceil(interval * adaptive_growth))``, otherwise it shrinks to
``max(adaptive_min_interval, floor(interval / adaptive_growth))``. The next refresh is due at
t + interval. A statistic that was due but never recorded (e.g. a non-finite batch value) stays
due. An inverse is recomputed exactly at the steps its statistic is due (refreshed); in between,
the statistic, its inverse and their communication are all skipped.

Counting: ``due(step)`` counts, once per step, each statistic as refreshed (due) or skipped (not
due); call it every step (it is idempotent: a second call for the same step returns the same
list and counts nothing). ``inverse_due(step, name)`` counts each (step, statistic) pair it is
asked about once, as inverse refreshed or skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

from hvd_ngd.config import KFACConfig, resolve_interval
from hvd_ngd.enums import IntervalPolicy


@dataclasses.dataclass
class StalenessCounts:
    """How many statistic (and inverse) refreshes were done and skipped.

    Attributes:
        refreshed: (step, statistic) pairs where the statistic was due.
        skipped: (step, statistic) pairs where it was not (its computation and bytes skipped).
        inverse_refreshed: (step, statistic) pairs asked about whose inverse was recomputed.
        inverse_skipped: (step, statistic) pairs asked about whose inverse was reused.
    """

    refreshed: int = 0
    skipped: int = 0
    inverse_refreshed: int = 0
    inverse_skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        """Fraction of statistic computations skipped (0.0 before any step)."""
        total = self.refreshed + self.skipped
        return self.skipped / total if total else 0.0

    @property
    def inverse_skipped_fraction(self) -> float:
        """Fraction of inverse computations skipped (0.0 before any query)."""
        total = self.inverse_refreshed + self.inverse_skipped
        return self.inverse_skipped / total if total else 0.0


class StalenessTracker:
    """Refresh schedule of named statistics (see the module docstring for the rules).

    Args:
        config: supplies the policy and its constants (``interval_policy``,
            ``factor_update_interval``, ``inv_update_interval``, ``adaptive_threshold``,
            ``adaptive_min_interval``, ``adaptive_max_interval``, ``adaptive_growth``).
        statistic_names: the statistics, in a fixed order identical on every rank.

    Raises:
        ValueError: duplicate statistic names.
    """

    def __init__(self, config: KFACConfig, statistic_names: Sequence[Any], intervals: Any = None) -> None:
        self.config = config
        # ``factor_update_interval`` / ``inv_update_interval`` are read from ``intervals`` (the
        # engine's scheduled hyperparameters) when given, else from ``config``.
        self._intervals = config if intervals is None else intervals
        self.names: List[str] = list(statistic_names)
        if len(set(self.names)) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"duplicate statistic names: {dupes}")
        self.adaptive = config.interval_policy is IntervalPolicy.ADAPTIVE
        self._interval: Dict[str, int] = {n: config.adaptive_min_interval for n in self.names}
        self._next_due: Dict[str, int] = {n: 0 for n in self.names}
        self._counts = StalenessCounts()
        self._step: Optional[int] = None  # the step ``due`` last counted
        self._due_now: List[str] = []
        self._inverse_step: Optional[int] = None
        self._inverse_now: Dict[str, bool] = {}
        self._bulk_skipped_step: Optional[int] = None

    @property
    def counts(self) -> StalenessCounts:
        """Refreshed and skipped counts so far."""
        return self._counts

    def _check_name(self, name: str) -> None:
        if name not in self._interval:
            raise KeyError(f"unknown statistic {name!r}; registered: {self.names[:5]}{'...' if len(self.names) > 5 else ''}")

    def due(self, step: int) -> List[str]:
        """Statistics to recompute and communicate at ``step``, in registration order.

        Counts each statistic as refreshed or skipped the first time a step is asked about.
        """
        if step == self._step:
            return list(self._due_now)
        if self.adaptive:
            due = [n for n in self.names if step >= self._next_due[n]]
        else:
            every = resolve_interval("factor_update_interval", self._intervals.factor_update_interval, step)
            due = list(self.names) if step % every == 0 else []
        self._step, self._due_now = step, due
        self._counts.refreshed += len(due)
        self._counts.skipped += len(self.names) - len(due)
        return list(due)

    def inverse_due(self, step: int, name: str) -> bool:
        """Whether the inverse of statistic ``name`` is recomputed at ``step``.

        FIXED: ``step % inv_update_interval(step) == 0``. ADAPTIVE: exactly when ``name`` is due
        at ``step`` (call ``due(step)`` first; the answer does not change when
        ``record_refresh`` runs in between).
        """
        self._check_name(name)
        if step != self._inverse_step:
            self._inverse_step, self._inverse_now = step, {}
        if name in self._inverse_now:
            return self._inverse_now[name]
        if self.adaptive:
            result = step == self._step and name in self._due_now
        else:
            every = resolve_interval("inv_update_interval", self._intervals.inv_update_interval, step)
            result = step % every == 0
        self._inverse_now[name] = result
        if result:
            self._counts.inverse_refreshed += 1
        else:
            self._counts.inverse_skipped += 1
        return result

    def skip_all_inverses(self, step: int, names: Sequence[Any]) -> bool:
        """FIXED policy: whether no inverse at all is due at ``step``; then ``names`` count as
        inverse-skipped once for this step and per-statistic queries are unnecessary (the hot
        path of steps with nothing to refresh). Always False under ADAPTIVE."""
        if self.adaptive:
            return False
        every = resolve_interval("inv_update_interval", self._intervals.inv_update_interval, step)
        if step % every == 0:
            return False
        if self._bulk_skipped_step != step:
            self._bulk_skipped_step = step
            self._counts.inverse_skipped += len(names)
        return True

    def quiet_steps(self, start: int, limit: int) -> int:
        """How many consecutive steps from ``start`` (at most ``limit``) refresh no statistic and
        no inverse, as far as the tracker knows now (a pure query: nothing is counted).

        FIXED: steps that are multiples of neither interval. ADAPTIVE: steps before the earliest
        next due step (an inverse is refreshed only with its statistic).
        """
        if self.adaptive:
            first = min(self._next_due.values()) if self._next_due else start + limit
            return max(0, min(limit, first - start))
        quiet = 0
        for step in range(start, start + limit):
            every = resolve_interval("factor_update_interval", self._intervals.factor_update_interval, step)
            inv_every = resolve_interval("inv_update_interval", self._intervals.inv_update_interval, step)
            if step % every == 0 or step % inv_every == 0:
                break
            quiet += 1
        return quiet

    def record_refresh(self, name: str, step: int, change: Optional[float]) -> None:
        """Adapt the interval of ``name`` after it was refreshed at ``step``.

        Args:
            name: the statistic.
            step: the step of the refresh.
            change: its relative change ||X_t - X_prev||_F / ||X_prev||_F; None (no previous value) counts
                as an infinite change. Ignored by the FIXED policy.
        """
        self._check_name(name)
        if not self.adaptive:
            return
        cfg = self.config
        value = math.inf if change is None else float(change)
        if value < cfg.adaptive_threshold:
            grown = int(math.ceil(self._interval[name] * cfg.adaptive_growth))
            self._interval[name] = min(cfg.adaptive_max_interval, grown)
        else:
            shrunk = int(math.floor(self._interval[name] / cfg.adaptive_growth))
            self._interval[name] = max(cfg.adaptive_min_interval, shrunk)
        self._next_due[name] = step + self._interval[name]

    def intervals(self) -> List[int]:
        """Current adaptive intervals, in statistic order."""
        return [self._interval[n] for n in self.names]

    def set_intervals(self, values: Sequence[int]) -> None:
        """Overwrite the intervals (in statistic order), e.g. with the owners' decisions."""
        self._interval = dict(zip(self.names, self._validated("intervals", values, 1)))

    def next_due(self) -> List[int]:
        """Next due step of every statistic, in statistic order (ADAPTIVE)."""
        return [self._next_due[n] for n in self.names]

    def set_next_due(self, values: Sequence[int]) -> None:
        """Overwrite the next due steps (in statistic order)."""
        self._next_due = dict(zip(self.names, self._validated("next_due", values, 0)))

    def _validated(self, what: str, values: Sequence[int], low: int) -> List[int]:
        out = [int(v) for v in values]
        if len(out) != len(self.names):
            raise ValueError(f"{what}: got {len(out)} values for {len(self.names)} statistics")
        if any(v < low for v in out):
            raise ValueError(f"{what}: every value must be >= {low}, got {out}")
        return out

    def state_dict(self) -> dict:
        """Plain-Python state: intervals, next due steps (dicts by name) and counts."""
        return {
            "interval": {str(n): v for n, v in self._interval.items()},
            "next_due": {str(n): v for n, v in self._next_due.items()},
            "counts": dataclasses.asdict(self._counts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` output.

        Raises:
            ValueError: the state names other statistics than this tracker's.
        """
        for key in ("interval", "next_due"):
            unknown = set(state[key]) ^ {str(n) for n in self.names}
            if unknown:
                raise ValueError(
                    f"stale-statistics state ({key}) does not match the registered statistics: {sorted(unknown)}"
                )
        self._interval = {n: int(state["interval"][str(n)]) for n in self.names}
        self._next_due = {n: int(state["next_due"][str(n)]) for n in self.names}
        self._counts = StalenessCounts(**{k: int(v) for k, v in state["counts"].items()})
        self._step, self._due_now = None, []
        self._inverse_step, self._inverse_now = None, {}
