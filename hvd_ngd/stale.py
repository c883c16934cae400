"""Stale statistics: when each curvature statistic (and its inverse) is refreshed.

FIXED: every statistic is refreshed when ``step % factor_update_interval == 0`` and inverses when
``step % inv_update_interval == 0`` (ints or callables of the step).

ADAPTIVE (SP-NGD): each statistic has its own interval. After a refresh at step t the relative
Frobenius change ||X_t - X_prev|| / ||X_prev|| of the running statistic is compared with
``adaptive_threshold``: below it the interval grows (x ``adaptive_growth``, at most
``adaptive_max_interval``), otherwise it shrinks (/ ``adaptive_growth``, at least
``adaptive_min_interval``). The next refresh is due at t + interval. An inverse is recomputed
exactly at the steps its statistic is refreshed; in between, the statistic, its inverse and
their communication are all skipped.

Call ``due(step)`` exactly once per step: it also counts refreshed and skipped statistics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Set

from hvd_ngd.config import KFACConfig, resolve_interval
from hvd_ngd.enums import IntervalPolicy
from hvd_ngd.ops.base import Array, ArrayOps


def relative_change(ops: ArrayOps, new: Array, previous: Optional[Array]) -> float:
    """||new - previous||_F / ||previous||_F (inf without a previous value)."""
    if previous is None:
        return math.inf
    base = ops.to_float(ops.frobenius_norm(previous))
    diff = ops.to_float(ops.frobenius_norm(new - previous))
    if base == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / base


@dataclasses.dataclass
class StalenessCounts:
    """How many statistic (and inverse) refreshes were done and skipped."""

    refreshed: int = 0
    skipped: int = 0
    inverse_refreshed: int = 0
    inverse_skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        """Fraction of statistic computations skipped."""
        total = self.refreshed + self.skipped
        return self.skipped / total if total else 0.0

    @property
    def inverse_skipped_fraction(self) -> float:
        """Fraction of inverse computations skipped."""
        total = self.inverse_refreshed + self.inverse_skipped
        return self.inverse_skipped / total if total else 0.0


class StalenessTracker:
    """Refresh schedule of named statistics.

    Args:
        config: supplies the policy and its constants.
        statistic_names: the statistics, in a fixed order identical on every rank.
    """

    def __init__(self, config: KFACConfig, statistic_names: Sequence[str]) -> None:
        self.config = config
        self.names: List[str] = list(statistic_names)
        self.adaptive = config.interval_policy is IntervalPolicy.ADAPTIVE
        self.interval: Dict[str, int] = {n: config.adaptive_min_interval for n in self.names}
        self.next_due: Dict[str, int] = {n: 0 for n in self.names}
        self.counts = StalenessCounts()
        self._due_now: Set[str] = set()
        self._step = -1

    def due(self, step: int) -> List[str]:
        """Statistics to recompute and communicate at ``step`` (call once per step)."""
        if self.adaptive:
            due = [n for n in self.names if step >= self.next_due[n]]
        else:
            every = resolve_interval("factor_update_interval", self.config.factor_update_interval, step)
            due = list(self.names) if step % every == 0 else []
        self._due_now = set(due)
        self._step = step
        self.counts.refreshed += len(due)
        self.counts.skipped += len(self.names) - len(due)
        return due

    def inverse_due(self, step: int, name: str) -> bool:
        """Whether the inverse of ``name`` is recomputed at ``step``."""
        if self.adaptive:
            result = step == self._step and name in self._due_now
        else:
            every = resolve_interval("inv_update_interval", self.config.inv_update_interval, step)
            result = step % every == 0
        if result:
            self.counts.inverse_refreshed += 1
        else:
            self.counts.inverse_skipped += 1
        return result

    def record_refresh(self, name: str, step: int, change: float) -> None:
        """Adapt the interval of ``name`` after a refresh whose relative change was ``change``."""
        if not self.adaptive:
            return
        cfg = self.config
        if change < cfg.adaptive_threshold:
            grown = int(math.ceil(self.interval[name] * cfg.adaptive_growth))
            self.interval[name] = min(cfg.adaptive_max_interval, grown)
        else:
            shrunk = int(math.floor(self.interval[name] / cfg.adaptive_growth))
            self.interval[name] = max(cfg.adaptive_min_interval, shrunk)
        self.next_due[name] = step + self.interval[name]

    def intervals(self) -> List[int]:
        """Current intervals, in statistic order."""
        return [self.interval[n] for n in self.names]

    def state_dict(self) -> dict:
        """Plain-Python state."""
        return {
            "interval": dict(self.interval),
            "next_due": dict(self.next_due),
            "counts": dataclasses.asdict(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` output."""
        unknown = set(state["interval"]) ^ set(self.names)
        if unknown:
            raise ValueError(f"stale-statistics state does not match the registered statistics: {sorted(unknown)}")
        self.interval = {k: int(v) for k, v in state["interval"].items()}
        self.next_due = {k: int(v) for k, v in state["next_due"].items()}
        self.counts = StalenessCounts(**state["counts"])
