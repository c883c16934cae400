"""KL clipping: bound the step's predicted KL change, as kfac-pytorch does."""

from __future__ import annotations

import math
from typing import Sequence

from hvd_ngd.ops.base import Array, ArrayOps


def kl_clip_scale_from_sum(vg_sum: float, lr: float, kl_clip: float) -> float:
    """min(1, sqrt(kl_clip / |lr^2 * vg_sum|)); 1 when the sum is zero or not finite."""
    value = abs(lr * lr * float(vg_sum))
    if value == 0.0 or not math.isfinite(value):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / value))


def kl_clip_scale(
    ops: ArrayOps, preconditioned: Sequence[Array], grads: Sequence[Array], lr: float, kl_clip: float
) -> float:
    """Scale of the preconditioned gradients ``v`` given raw gradients ``g``: sum_i v_i . g_i."""
    if len(preconditioned) != len(grads):
        raise ValueError(f"{len(preconditioned)} preconditioned gradients but {len(grads)} gradients")
    total = 0.0
    for v, g in zip(preconditioned, grads):
        total += ops.to_float(ops.sum(v * g))
    return kl_clip_scale_from_sum(total, lr, kl_clip)
