"""Read-mostly views of the engine's state for adapters, tests and users
(``engine.factors["fc1/A"]``, ``engine.layer_damping``, ...)."""

from __future__ import annotations

import collections.abc
from typing import Any, Dict, Iterator, List, Set, Tuple

from hvd_ngd.keys import StatKey, Statistic
from hvd_ngd.ops.base import Array


class FactorView(collections.abc.MutableMapping):
    """Per-statistic values keyed by their string names (``"layer/A"``), for inspection."""

    def __init__(self, factors: Dict[StatKey, Any]) -> None:
        self._factors = factors

    def __getitem__(self, name: str) -> Array:
        return self._factors[StatKey.parse(name)]

    def __setitem__(self, name: str, value: Array) -> None:
        self._factors[StatKey.parse(name)] = value

    def __delitem__(self, name: str) -> None:
        del self._factors[StatKey.parse(name)]

    def __iter__(self) -> Iterator[str]:
        return (str(k) for k in self._factors)

    def __len__(self) -> int:
        return len(self._factors)


class EngineViews:
    """Properties of ``Preconditioner`` that expose its parts (mixin; no state of its own)."""

    state: Any
    placement: Any
    schedule: Any
    stat_keys: List[StatKey]
    statistics: Any

    @property
    def steps(self) -> int:
        """Preconditioned steps taken."""
        return self.state.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.state.steps = int(value)

    @property
    def plan(self) -> Any:
        """The layer-to-rank assignment."""
        return self.placement.plan

    @property
    def tracker(self) -> Any:
        """The stale-statistics tracker (``tracker.counts`` has refreshed / skipped counts)."""
        return self.schedule.tracker

    @property
    def stat_names(self) -> List[StatKey]:
        """Every statistic's key, in registration order."""
        return list(self.stat_keys)

    @property
    def inverses(self) -> FactorView:
        """The decompositions / inverses this rank holds, by string name."""
        return FactorView(self.state.inverses)

    @property
    def factors(self) -> FactorView:
        """The running factors this rank holds, by string name (``"fc1/A"``)."""
        return FactorView(self.state.factors)

    def factor(self, layer: str, statistic: str) -> Array:
        """One running factor (``statistic`` is ``"A"``, ``"G"`` or ``"F"``)."""
        return self.state.factors[StatKey(layer, Statistic(statistic))]

    @property
    def layer_damping(self) -> Dict[str, float]:
        """Per-layer damping (base damping, escalated after failures)."""
        return self.state.layer_damping

    @layer_damping.setter
    def layer_damping(self, value: Dict[str, float]) -> None:
        self.state.layer_damping.clear()
        self.state.layer_damping.update(value)

    @property
    def force_inverse(self) -> Set[StatKey]:
        """Statistics whose inverse is recomputed at the next step."""
        return self.state.force_inverse

    @property
    def fallbacks(self) -> List[Tuple[int, str, str]]:
        """(step, layer, reason) of every plain-gradient fallback."""
        return self.state.fallbacks

    @property
    def overlap(self) -> bool:
        """Whether KAISA factor allreduces still start in the hooks (off after accumulation)."""
        return not self.statistics.accumulated

