"""Hyperparameters of the engine: scheduled changes between steps, and the per-step check that
every rank steps with the same values (one small allgather, which also carries each rank's
gradient-finiteness flag and shares escalated per-layer damping)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from hvd_ngd import consistency
from hvd_ngd.enums import InverseMethod
from hvd_ngd.ops.base import Array


class EngineHyperparameters:
    """Hyperparameter methods of ``Preconditioner`` (mixin; the state is the engine's:
    ``schedule``, ``state``, ``guard``)."""

    config: Any
    blocks: Any
    comm: Any
    ops: Any
    world: int
    schedule: Any
    state: Any
    guard: Any
    _checked_step: int

    def set_hyperparameters(self, **values: Any) -> None:
        """Change hyperparameters between steps (a schedule); every rank must do the same.

        ``damping`` keeps each layer's escalation factor (a layer whose damping was raised after
        failures stays that many times above the new base, capped by ``max_damping``); with the
        Cholesky method, whose inverses hold the damping, every inverse is recomputed at the next
        step. The per-step consistency check reports ranks that scheduled differently.

        Args:
            **values: new values of ``SCHEDULABLE`` fields (validated as ``KFACConfig`` does).

        Raises:
            ValueError: an unknown or unschedulable name, or an invalid value (named).
        """
        old_damping = self.schedule.values.damping
        self.schedule.set(**values)
        new_damping = self.schedule.values.damping
        if new_damping != old_damping:
            for n, current in self.state.layer_damping.items():
                self.state.layer_damping[n] = min(self.config.max_damping, new_damping * (current / old_damping))
            if self.config.inverse_method is InverseMethod.CHOLESKY:
                self.state.force_inverse.update(k for b in self.blocks.values() for k in b.inverted)

    def hyperparameters(self, extra: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """The values every rank must agree on at this step (see ``check_hyperparameters``).

        Args:
            extra: values the adapter adds, e.g. the optimizer's ``optimizer.momentum``.
        """
        values = self.schedule.compared(self.state.steps)
        values.update({k: float(v) for k, v in (extra or {}).items()})
        return values

    def scheduled_hyperparameters(self) -> Dict[str, Any]:
        """Current values of the ``SCHEDULABLE`` fields (saved by ``state_dict``)."""
        return self.schedule.saved()

    def load_hyperparameters(self, values: Mapping[str, Any]) -> None:
        """Set ``scheduled_hyperparameters`` output as it was saved."""
        self.schedule.load(values)

    def check_hyperparameters(self, extra: Optional[Mapping[str, float]] = None, like: Optional[Array] = None) -> None:
        """Raise ``RankMismatchError`` on every rank when ranks step with different values.

        Runs every ``consistency_check_interval`` steps on more than one rank: one allgather of
        a few float64 values, before any gradient of the step is communicated.
        """
        every = self.config.consistency_check_interval
        steps = self.state.steps
        if self.world == 1 or not every or steps % every or self._checked_step == steps:
            return
        # Per-layer damping is escalated only where a layer is preconditioned (its SP-NGD owner
        # or KAISA gradient workers): the same allgather shares the largest value with every rank.
        shared = {f"layer_damping.{n}": d for n, d in self.state.layer_damping.items()}
        flag = self.guard.take()
        merged = consistency.check_hyperparameters(
            self.comm, self.ops, self.hyperparameters(extra), steps, like, shared_max=shared, device_value=flag
        )
        for n in self.state.layer_damping:
            self.state.layer_damping[n] = merged[f"layer_damping.{n}"]
        if flag is not None:
            self.guard.shared([merged[f"device_value.r{r}"] for r in range(self.world)], steps)
        self._checked_step = steps
