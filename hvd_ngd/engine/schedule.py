"""The step's schedule: which statistics are due, and the scheduled hyperparameters.

``KFACConfig`` is validated once and never changed by the engine; what a schedule may change
between steps (learning rate for KL clipping, damping, factor decay, KL clip, intervals) lives
in ``Hyperparameters``, owned here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hvd_ngd import stale
from hvd_ngd.config import Interval, KFACConfig, resolve_interval
from hvd_ngd.enums import IntervalPolicy
from hvd_ngd.keys import StatKey

SCHEDULABLE = ("lr", "damping", "factor_decay", "kl_clip", "factor_update_interval", "inv_update_interval")


@dataclasses.dataclass
class Hyperparameters:
    """The values a schedule may change between steps (validated as ``KFACConfig`` does)."""

    lr: float
    damping: float
    factor_decay: float
    kl_clip: Optional[float]
    factor_update_interval: Interval
    inv_update_interval: Interval

    @classmethod
    def from_config(cls, config: KFACConfig) -> "Hyperparameters":
        """The configured starting values."""
        return cls(**{name: getattr(config, name) for name in SCHEDULABLE})


class Schedule:
    """Due statistics per step (the stale-statistics tracker) and scheduled hyperparameters.

    Args:
        config: the validated configuration (never mutated).
        keys: every statistic, in a fixed order identical on every rank.
    """

    def __init__(self, config: KFACConfig, keys: Sequence[StatKey]) -> None:
        self.config = config
        self.keys: Tuple[StatKey, ...] = tuple(keys)
        self.values = Hyperparameters.from_config(config)
        self.tracker = stale.StalenessTracker(config, list(keys), intervals=self.values)
        self.adaptive = config.interval_policy is IntervalPolicy.ADAPTIVE
        self._step: Optional[int] = None
        self._due: Tuple[StatKey, ...] = ()
        self._plans: Dict[Tuple[StatKey, ...], Dict[str, Set[str]]] = {}

    # ------------------------------------------------------------------ due statistics
    def due(self, step: int) -> Tuple[StatKey, ...]:
        """Statistics to compute and communicate at ``step`` (computed once per step)."""
        if step != self._step:
            due = self.tracker.due(step)
            self._due = self.keys if len(due) == len(self.keys) else tuple(due)
            self._step = step
        return self._due

    def capture_plan(self, step: int) -> Dict[str, Set[str]]:
        """Layer -> statistic kinds whose batch value the hooks must capture at ``step``.

        Under the FIXED policy a step is either fully due or not at all, so two plans are built
        once; adaptive schedules build one per due pattern (bounded cache).
        """
        due = self.due(step)
        plan = self._plans.get(due)
        if plan is None:
            plan = {}
            for key in due:
                plan.setdefault(key.layer, set()).add(key.statistic.value)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[due] = plan
        return plan

    def inverse_due(self, step: int, key: StatKey) -> bool:
        """Whether the inverse of ``key`` is recomputed at ``step`` by schedule."""
        return self.tracker.inverse_due(step, key)

    def forget_step(self) -> None:
        """Recompute the due statistics at the next query (after a state load)."""
        self._step = None

    # ------------------------------------------------------------------ hyperparameters
    def set(self, **values: Any) -> None:
        """Change scheduled hyperparameters (validated as ``KFACConfig`` validates them).

        Raises:
            ValueError: an unknown or unschedulable name, or an invalid value (named).
        """
        unknown = sorted(set(values) - set(SCHEDULABLE))
        if unknown:
            raise ValueError(f"cannot schedule {unknown}: schedulable hyperparameters are {list(SCHEDULABLE)}")
        current = dataclasses.asdict(self.values)
        current.update(values)
        dataclasses.replace(self.config, **current)  # validates, naming the parameter
        for name, value in values.items():
            setattr(self.values, name, value)

    def saved(self) -> Dict[str, Any]:
        """Current scheduled values for a checkpoint (intervals given as callables are left out:
        every rank builds them alike)."""
        out: Dict[str, Any] = {}
        for name in SCHEDULABLE:
            value = getattr(self.values, name)
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                out[name] = value
        return out

    def load(self, values: Mapping[str, Any]) -> None:
        """Restore ``saved`` output."""
        for name, value in values.items():
            setattr(self.values, name, value)

    def compared(self, step: int) -> Dict[str, float]:
        """The values every rank must agree on at ``step``."""
        v = self.values
        out: Dict[str, float] = {
            "step": float(step),
            "lr": float(v.lr),
            "damping": float(v.damping),
            "factor_decay": float(v.factor_decay),
            "kl_clip": -1.0 if v.kl_clip is None else float(v.kl_clip),
        }
        if not self.adaptive:
            for name in ("factor_update_interval", "inv_update_interval"):
                out[name] = float(resolve_interval(name, getattr(v, name), step))
        return out

    @staticmethod
    def schedulable() -> List[str]:
        """Names ``set`` accepts."""
        return list(SCHEDULABLE)
