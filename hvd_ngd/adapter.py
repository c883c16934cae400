"""What both adapters' ``KFAC`` objects expose of their engine (framework-neutral)."""

from __future__ import annotations

from typing import Any, Dict

from hvd_ngd.stale import StalenessCounts


class EngineAPI:
    """Mixin for an adapter object whose ``engine`` is a ``hvd_ngd.Preconditioner``."""

    engine: Any

    @property
    def steps(self) -> int:
        """Number of preconditioned steps so far."""
        return self.engine.steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because some rank's gradients were not finite."""
        return self.engine.skipped_steps

    def set_hyperparameters(self, **values: Any) -> None:
        """Change ``lr``, ``damping``, ``factor_decay``, ``kl_clip``, ``factor_update_interval``
        or ``inv_update_interval`` between steps (a schedule); every rank must do the same.

        Raises:
            ValueError: an unknown or unschedulable name, or an invalid value (named).
        """
        self.engine.set_hyperparameters(**values)

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        """The current scheduled hyperparameters."""
        return self.engine.scheduled_hyperparameters()

    @property
    def statistics_counts(self) -> StalenessCounts:
        """Statistic and inverse computations done and skipped so far (stale statistics)."""
        return self.engine.tracker.counts
