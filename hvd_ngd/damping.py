"""Tikhonov damping of Kronecker factors, with the pi-correction of Martens & Grosse."""

from __future__ import annotations

import math
from typing import Tuple

from hvd_ngd.ops.base import Array, ArrayOps


def _mean_eigenvalue(ops: ArrayOps, x: Array, diagonal: bool) -> float:
    if diagonal:
        return ops.to_float(ops.sum(x)) / ops.shape(x)[0]
    return ops.to_float(ops.trace(x)) / ops.shape(x)[0]


def pi_correction(ops: ArrayOps, a: Array, g: Array, a_is_diagonal: bool = False) -> float:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)); 1.0 when either trace is not positive/finite."""
    ta = _mean_eigenvalue(ops, a, a_is_diagonal)
    tg = _mean_eigenvalue(ops, g, False)
    if not (math.isfinite(ta) and math.isfinite(tg)) or ta <= 0.0 or tg <= 0.0:
        return 1.0
    return math.sqrt(ta / tg)


def cholesky_damping(
    ops: ArrayOps, a: Array, g: Array, damping: float, use_pi: bool, a_is_diagonal: bool = False
) -> Tuple[float, float]:
    """Split ``damping`` between the factors: (pi sqrt(l), sqrt(l) / pi), or sqrt(l) each."""
    root = math.sqrt(damping)
    pi = pi_correction(ops, a, g, a_is_diagonal) if use_pi else 1.0
    return pi * root, root / pi
