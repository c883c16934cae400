"""Steps whose gradients are not finite on some rank: every rank skips them alike.

The local indicator is computed on the device (0, or NaN when some gradient entry is not finite:
``total - total`` of the summed gradients) and travels in the step's consistency allgather, so it
costs no extra collective at checked steps; at other steps one 1-element allreduce decides (which
cannot tell the rank), and a 1-rank world reads the indicator itself.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

from hvd_ngd.communicator import Communicator
from hvd_ngd.ops.base import Array, ArrayOps


class NonFiniteGradientWarning(RuntimeWarning):
    """Some rank's gradients were not finite: every rank skipped the step's update."""


class GradientGuard:
    """Decides, identically on every rank, whether a step's gradients are finite everywhere.

    Attributes:
        skips: (step, ranks) of every skipped step.
    """

    def __init__(self, ops: ArrayOps, comm: Communicator, enabled: bool) -> None:
        self.ops = ops
        self.comm = comm
        self.enabled = enabled
        self.pending: Optional[Array] = None  # this step's local indicator, not yet shared
        self.decided_step = -1
        self.ranks: List[int] = []
        self.skips: List[Tuple[int, List[int]]] = []

    def prepare(self, grads: Sequence[Array], step: int) -> None:
        """Compute the local indicator of ``step`` (once per step)."""
        if not self.enabled or self.decided_step == step or self.pending is not None or not grads:
            return
        total = self.ops.total_sum(grads)
        self.pending = total - total

    def take(self) -> Optional[Array]:
        """The pending indicator, for the consistency allgather (None: nothing to send)."""
        return self.pending

    def shared(self, values: Sequence[float], step: int) -> None:
        """Every rank's indicator, as the consistency allgather returned it."""
        self.ranks = [r for r, v in enumerate(values) if not math.isfinite(v)]
        self.pending = None
        self.decided_step = step

    def decide(self, world: int, step: int) -> List[int]:
        """Ranks whose gradients were not finite at ``step`` (the same list on every rank)."""
        if not self.enabled:
            return []
        if self.pending is None:
            return self.ranks if self.decided_step == step else []
        flag, self.pending = self.pending, None
        self.decided_step = step
        ops = self.ops
        if world > 1:
            flag = self.comm.allreduce(ops.reshape(flag, (1,)), name=f"hvd_ngd.finite.s{step}", average=False)
            self.ranks = list(range(world)) if not math.isfinite(ops.to_float(ops.sum(flag))) else []
        else:
            self.ranks = [0] if not math.isfinite(ops.to_float(flag)) else []
        return self.ranks

    def record_skip(self, ranks: List[int], step: int, world: int, local_gradients: bool) -> None:
        """Count and warn about a skipped step; the same step number comes again."""
        self.skips.append((step, list(ranks)))
        if len(ranks) < world or world == 1:
            who = "non-finite gradients on rank(s) " + ", ".join(str(r) for r in ranks)
        elif local_gradients:
            who = "non-finite gradients on some rank"
        else:
            who = "non-finite gradients (averaged over ranks by Horovod: the rank is not known)"
        warnings.warn(
            f"hvd_ngd: {who} at step {step}: every rank skips this update and folds none of its statistics "
            f"({len(self.skips)} step(s) skipped so far)",
            NonFiniteGradientWarning,
            stacklevel=4,
        )
        self.decided_step = -1
