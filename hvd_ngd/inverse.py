"""Inversion of damped Kronecker factors and preconditioning with them.

Two methods (``InverseMethod``):
    * EIGEN: A = Qa diag(da) Qa^T, G = Qg diag(dg) Qg^T; the preconditioned gradient is
      Qg [(Qg^T dW Qa) / (dg da^T + l)] Qa^T, the exact inverse of A (x) G + l I. Damping is
      applied at preconditioning time, so changing it needs no new decomposition.
    * CHOLESKY: (A + dA I)^-1 and (G + dG I)^-1 with the damping split by ``damping.cholesky_damping``
      (pi-corrected); the preconditioned gradient is G^-1 dW A^-1.
Decompositions run in at least float32 (float16/bfloat16 factors are upcast; float64 stays).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

from hvd_ngd.enums import InverseMethod
from hvd_ngd.ops.base import Array, ArrayOps


@dataclasses.dataclass
class FactorInverse:
    """What preconditioning needs of one factor.

    Attributes:
        method: how it was computed.
        eigvals: EIGEN: eigenvalues clamped at 0 (for a diagonal factor: the diagonal).
        eigvecs: EIGEN: eigenvectors (None for a diagonal factor).
        inverse: CHOLESKY: damped inverse (1-D damped reciprocal for a diagonal factor).
    """

    method: InverseMethod
    eigvals: Optional[Array] = None
    eigvecs: Optional[Array] = None
    inverse: Optional[Array] = None


def compute_dtype(ops: ArrayOps, x: Array) -> str:
    """float64 for float64 factors, float32 for everything narrower."""
    return "float64" if ops.dtype_name(x) == "float64" else "float32"


def invert_factor(
    ops: ArrayOps, factor: Array, method: InverseMethod, damping_share: float = 0.0, diagonal: bool = False
) -> FactorInverse:
    """Decompose (EIGEN) or invert with damping (CHOLESKY) one factor.

    Args:
        ops: array backend.
        factor: symmetric PSD matrix, or a vector for a diagonal factor.
        method: EIGEN or CHOLESKY.
        damping_share: damping added before a CHOLESKY inverse (ignored by EIGEN).
        diagonal: ``factor`` is the diagonal of a diagonal factor.
    """
    x = ops.cast(factor, compute_dtype(ops, factor))
    if method is InverseMethod.EIGEN:
        if diagonal:
            return FactorInverse(method, eigvals=ops.maximum(x, 0.0))
        vals, vecs = ops.eigh(x)
        return FactorInverse(method, eigvals=ops.maximum(vals, 0.0), eigvecs=vecs)
    if diagonal:
        return FactorInverse(method, inverse=1.0 / (x + damping_share))
    n = ops.shape(x)[0]
    return FactorInverse(method, inverse=ops.cholesky_inverse(x + ops.eye(n, x) * damping_share))


def precondition_kronecker(
    ops: ArrayOps, grad: Array, a_inv: FactorInverse, g_inv: FactorInverse, damping: float
) -> Array:
    """(A (x) G + damping)^-1 applied to a gradient matrix (out, a_dim); result in grad's dtype."""
    out_dtype = ops.dtype_name(grad)
    ref = a_inv.eigvals if a_inv.method is InverseMethod.EIGEN else a_inv.inverse
    v = ops.cast(grad, ops.dtype_name(ref))
    rows, cols = ops.shape(v)
    if a_inv.method is InverseMethod.EIGEN:
        v = ops.matmul(ops.transpose(g_inv.eigvecs), v)
        if a_inv.eigvecs is not None:
            v = ops.matmul(v, a_inv.eigvecs)
        denom = ops.reshape(g_inv.eigvals, (rows, 1)) * ops.reshape(a_inv.eigvals, (1, cols)) + damping
        v = ops.matmul(g_inv.eigvecs, v / denom)
        if a_inv.eigvecs is not None:
            v = ops.matmul(v, ops.transpose(a_inv.eigvecs))
    else:
        v = ops.matmul(g_inv.inverse, v)
        if len(ops.shape(a_inv.inverse)) == 1:
            v = v * ops.reshape(a_inv.inverse, (1, cols))
        else:
            v = ops.matmul(v, a_inv.inverse)
    return ops.cast(v, out_dtype)


def inverse_to_tensors(inv: FactorInverse) -> List[Array]:
    """The tensors of an inverse in wire order (see ``inverse_from_tensors``)."""
    if inv.method is InverseMethod.EIGEN:
        return [inv.eigvals] if inv.eigvecs is None else [inv.eigvals, inv.eigvecs]
    return [inv.inverse]


def inverse_from_tensors(
    ops: ArrayOps, method: InverseMethod, diagonal: bool, tensors: Sequence[Array]
) -> FactorInverse:
    """Rebuild a ``FactorInverse`` from ``inverse_to_tensors`` output."""
    if method is InverseMethod.EIGEN:
        return FactorInverse(method, eigvals=tensors[0], eigvecs=None if diagonal else tensors[1])
    return FactorInverse(method, inverse=tensors[0])
