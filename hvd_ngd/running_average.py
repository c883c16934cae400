"""Exponential moving average of curvature statistics."""

from __future__ import annotations

from typing import Optional

from hvd_ngd.ops.base import Array, ArrayOps


def ema(ops: ArrayOps, average: Optional[Array], batch_value: Array, decay: float) -> Array:
    """decay * average + (1 - decay) * batch_value; the first value (average None) is taken as is.

    Decay 0 keeps the current batch only (what SP-NGD used at very large batches).
    """
    if average is None or decay == 0.0:
        return batch_value
    return average * decay + batch_value * (1.0 - decay)
