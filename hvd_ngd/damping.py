"""Tikhonov damping of curvature blocks: the rule that turns the configured ``damping`` into the
lambda a layer is damped with, and the pi-corrected split of Martens & Grosse.

Two rules (``DampingRule``, NGD_NOTES section 3):
    * ABSOLUTE: lambda = damping, the same number for every layer (kfac-pytorch's convention).
      Whether it is tiny or huge depends on each layer's factor scale.
    * RELATIVE: lambda = damping * mean eigenvalue of the block. For a Kronecker block
      A (x) G that is damping * (tr A / dim A) * (tr G / dim G); for a unit-wise BN/LN block the
      mean eigenvalue of its 2x2 Fishers, mean_c (F_c,gg + F_c,bb) / 2. Scaling the inputs or
      the loss of a layer by any factor leaves the preconditioned step unchanged (scale
      invariance by construction), so one ``damping`` fits layers and models of unlike scale.

Distributed consistency: every quantity the rules read (factors, eigenvalues) is identical on
every rank that preconditions a layer (factors are averaged over ranks, eigenvalues are
broadcast with the inverse), so every rank reaches the same lambda with no extra collective,
and the lambda is a pure function of the state that ``state_dict`` already saves.

The Kronecker RELATIVE lambda is computed from the eigenvalues on the device (no host read);
the CHOLESKY split reads the two traces on the host, once per inverse computation.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from hvd_ngd.enums import DampingRule
from hvd_ngd.ops.base import Array, ArrayOps

#: Smallest block scale the RELATIVE rule uses; a block whose mean eigenvalue is below it
#: (a dead layer: zero activations or output gradients) is damped as if its scale were this.
SCALE_FLOOR = 1e-20


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


def relative_scale(mean_a: float, mean_g: float) -> float:
    """Mean eigenvalue of A (x) G from the factors' mean eigenvalues, floored at ``SCALE_FLOOR``
    (and at the floor when either is not finite: the layer then falls back as any non-finite
    curvature does)."""
    scale = mean_a * mean_g
    if not math.isfinite(scale):
        return SCALE_FLOOR
    return max(scale, SCALE_FLOOR)


def cholesky_damping(
    ops: ArrayOps,
    a: Array,
    g: Array,
    damping: float,
    use_pi: bool,
    a_is_diagonal: bool = False,
    rule: DampingRule = DampingRule.ABSOLUTE,
) -> Tuple[float, float]:
    """The damping added to A and to G before their Cholesky inverses.

    With lambda the rule's damping of A (x) G: (pi sqrt(lambda), sqrt(lambda) / pi) with
    ``use_pi``, else sqrt(lambda) each. Under RELATIVE with pi this is
    (sqrt(damping) tr A / dim A, sqrt(damping) tr G / dim G): each factor damped relative to
    its own scale.
    """
    if rule is DampingRule.RELATIVE:
        ma = _mean_eigenvalue(ops, a, a_is_diagonal)
        mg = _mean_eigenvalue(ops, g, False)
        damping = damping * relative_scale(ma, mg)
    root = math.sqrt(damping)
    pi = pi_correction(ops, a, g, a_is_diagonal) if use_pi else 1.0
    return pi * root, root / pi


def kronecker_damping(
    ops: ArrayOps, a_eigvals: Optional[Array], g_eigvals: Optional[Array], damping: float, rule: DampingRule
) -> "float | Array":
    """lambda of an eigendecomposed Kronecker block A (x) G (EIGEN method).

    Args:
        ops: array backend.
        a_eigvals: eigenvalues of A (the diagonal of a diagonal A), clamped at 0; None for
            Cholesky inverses (which hold their damping already; then ``damping`` is returned).
        g_eigvals: eigenvalues of G, clamped at 0.
        damping: the layer's configured (possibly escalated) damping.
        rule: ABSOLUTE or RELATIVE.

    Returns:
        ``damping`` (ABSOLUTE), or a 0-d array on the eigenvalues' device:
        damping * max(mean(a_eigvals) * mean(g_eigvals), SCALE_FLOOR) (RELATIVE).
    """
    if rule is DampingRule.ABSOLUTE or a_eigvals is None or g_eigvals is None:
        return damping
    n = ops.shape(a_eigvals)[0] * ops.shape(g_eigvals)[0]
    scale = ops.sum(a_eigvals) * ops.sum(g_eigvals) / float(n)
    return ops.maximum(scale, SCALE_FLOOR) * damping


def unitwise_damping(ops: ArrayOps, fisher: Array, damping: float, rule: DampingRule) -> "float | Array":
    """lambda of a unit-wise BN/LN layer from its (C, 3) blocks [F_gg, F_gb, F_bb].

    Returns:
        ``damping`` (ABSOLUTE), or a 0-d array: damping * max(mean_c (F_gg + F_bb) / 2,
        SCALE_FLOOR), the mean eigenvalue of the layer's 2x2 Fishers (RELATIVE).
    """
    if rule is DampingRule.ABSOLUTE:
        return damping
    channels = ops.shape(fisher)[0]
    scale = (ops.sum(fisher[:, 0]) + ops.sum(fisher[:, 2])) / (2.0 * channels)
    return ops.maximum(scale, SCALE_FLOOR) * damping
