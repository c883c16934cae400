"""KL clipping: bound the step's predicted KL change, as kfac-pytorch does."""

from __future__ import annotations

import math



def kl_clip_scale_from_sum(vg_sum: float, lr: float, kl_clip: float) -> float:
    """min(1, sqrt(kl_clip / |lr^2 * vg_sum|)); 1 when the sum is zero or not finite."""
    value = abs(lr * lr * float(vg_sum))
    if value == 0.0 or not math.isfinite(value):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / value))
