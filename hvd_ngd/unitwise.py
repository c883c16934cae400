"""Unit-wise natural gradient of BatchNorm / LayerNorm (SP-NGD).

For each channel c the per-sample pair (dL/dgamma_c, dL/dbeta_c) gives a 2x2 Fisher block
F_c = E_n[[dg^2, dg db], [dg db, db^2]]; the damped blocks are inverted in closed form, all
channels at once. This is not a Kronecker factorization.
"""

from __future__ import annotations

from typing import Tuple

from hvd_ngd.ops.base import Array, ArrayOps


def normalized_input(ops: ArrayOps, y: Array, gamma: Array, beta: Array) -> Array:
    """x_hat = (y - beta) / gamma of a normalization layer's output y in the (N, C, L) layout,
    0 for channels whose gamma is 0 (their x_hat cannot be recovered; dL/dgamma then uses 0)."""
    c = ops.shape(gamma)[0]
    return (y - ops.reshape(beta, (1, c, 1))) * ops.reshape(ops.safe_reciprocal(gamma), (1, c, 1))


def unitwise_per_sample_grads(ops: ArrayOps, x_hat: Array, g: Array, grad_scale: float = 1.0) -> Tuple[Array, Array]:
    """Per-sample (dgamma, dbeta), each (N, C), from x_hat and output gradients (N, C, L)."""
    dgamma = ops.sum(g * x_hat, 2) * grad_scale
    dbeta = ops.sum(g, 2) * grad_scale
    return dgamma, dbeta


def unitwise_fisher(ops: ArrayOps, x_hat: Array, g: Array, grad_scale: float = 1.0) -> Array:
    """(C, 3) blocks [E dgamma^2, E dgamma*dbeta, E dbeta^2] per channel."""
    dgamma, dbeta = unitwise_per_sample_grads(ops, x_hat, g, grad_scale)
    n = ops.shape(dgamma)[0]
    return ops.stack(
        [ops.sum(dgamma * dgamma, 0) / n, ops.sum(dgamma * dbeta, 0) / n, ops.sum(dbeta * dbeta, 0) / n], 1
    )


def unitwise_precondition(
    ops: ArrayOps, fisher: Array, grad_gamma: Array, grad_beta: Array, damping: float
) -> Tuple[Array, Array]:
    """Solve (F_c + damping I) [pg; pb] = [grad_gamma_c; grad_beta_c] for every channel."""
    a = fisher[:, 0] + damping
    b = fisher[:, 1]
    d = fisher[:, 2] + damping
    det = a * d - b * b
    pg = (d * grad_gamma - b * grad_beta) / det
    pb = (a * grad_beta - b * grad_gamma) / det
    return pg, pb
