"""Batch statistics captured by the adapters' hooks during one step."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array


class BatchStatistics:
    """Sums micro-batch statistics until the step consumes them.

    Args:
        on_first: called with (key, value) when a statistic arrives for the first time in a step
            (KAISA starts its factor allreduce there, overlapping backprop).

    Attributes:
        accumulated: True once a second micro-batch arrived for some statistic (gradient
            accumulation): early sends are then invalid and later steps stop sending early.
    """

    def __init__(self, on_first: Optional[Callable[[StatKey, Array], None]] = None) -> None:
        self._values: Dict[StatKey, Tuple[Array, int]] = {}
        self._on_first = on_first
        self.accumulated = False

    def add(self, key: StatKey, value: Array) -> None:
        """Add one micro-batch's value."""
        current = self._values.get(key)
        if current is not None:
            self._values[key] = (current[0] + value, current[1] + 1)
            self.accumulated = True
            return
        self._values[key] = (value, 1)
        if self._on_first is not None and not self.accumulated:
            self._on_first(key, value)

    def mean(self, key: StatKey, step: int) -> Array:
        """Mean over micro-batches of a due statistic.

        Raises:
            RuntimeError: the layer's hooks never produced it (functional use of its weight, or
                the layer was not part of the forward/backward pass).
        """
        entry = self._values.get(key)
        if entry is None:
            raise RuntimeError(
                f"layer {key.layer!r} produced no curvature statistics at step {step}: its hooks never "
                "fired (is its weight used functionally, or was the layer not part of the forward/backward "
                "pass?). Exclude it with skip_layers, or run forward and backward before step()."
            )
        total, count = entry
        return total if count == 1 else total / count

    def clear(self) -> None:
        """Forget the step's values."""
        self._values.clear()
