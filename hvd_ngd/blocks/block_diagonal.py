"""Block-diagonal Kronecker factors: extract the diagonal blocks, invert each, precondition.

With A ~ diag(A_1..A_p) and G ~ diag(G_1..G_q) (``BlockLayout`` of each), the Kronecker product
A (x) G is, up to a permutation, block-diagonal with blocks A_i (x) G_j acting on the gradient
sub-block V[rows of G_j, columns of A_i]. Hence (A (x) G + l I)^-1 vec(V) is computed per block
exactly as ``inverse.precondition_kronecker`` does for whole factors:

    EIGEN:    Q_G^T V Q_A / (d_G d_A^T + l), mapped back, with Q = diag(Q_1..Q_k) and d the
              concatenated eigenvalues, applied as one matmul per block row/column slab;
    CHOLESKY: diag(G_j^-1) V diag(A_i^-1), each damped factor block inverted on its own.

k = 1 on both sides gives exactly today's result. Everything runs through ``ArrayOps`` plus
basic slicing (``x[a:b]``, ``x[:, a:b]``), which numpy, torch and TensorFlow tensors share.
"""

from __future__ import annotations

import math
from typing import List, Sequence

from hvd_ngd.blocks.layout import BlockLayout
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import FactorInverse, invert_factor, precondition_kronecker
from hvd_ngd.ops.base import Array, ArrayOps


def _check_layout(ops: ArrayOps, x: Array, layout: BlockLayout, what: str) -> None:
    n = ops.shape(x)[0]
    if n != layout.n:
        raise ValueError(f"{what}: factor side {n} does not match the block layout's n={layout.n}")


def extract_blocks(ops: ArrayOps, factor: Array, layout: BlockLayout, diagonal: bool = False) -> List[Array]:
    """The diagonal blocks of a factor (or slices of the vector of a diagonal factor).

    Args:
        ops: array backend.
        factor: n x n symmetric matrix, or the length-n vector of a diagonal factor.
        layout: how to cut it.
        diagonal: ``factor`` is a vector.
    """
    _check_layout(ops, factor, layout, "extract_blocks")
    if diagonal:
        return [factor[s] for s in layout.slices()]
    return [factor[s, s] for s in layout.slices()]


def block_gram(ops: ArrayOps, x: Array, layout: BlockLayout, scale: float = 1.0) -> List[Array]:
    """Diagonal blocks of ``scale * x^T x`` for x (N, n), without forming the n x n product.

    This is how a split statistic is computed from activations or output gradients directly:
    block i is ``scale * x[:, s_i]^T x[:, s_i]`` (sum of size_i^2 N work instead of n^2 N).
    """
    cols = ops.shape(x)[-1]
    if cols != layout.n:
        raise ValueError(f"block_gram: x has {cols} columns but the block layout has n={layout.n}")
    out = []
    for s in layout.slices():
        part = x[:, s]
        out.append(ops.matmul(ops.transpose(part), part) * scale)
    return out


def blocks_mean_eigenvalue(ops: ArrayOps, blocks: Sequence[Array], diagonal: bool = False) -> float:
    """tr(F) / n of a factor from its diagonal blocks (the blocks hold its whole trace).

    What the pi-correction of CHOLESKY damping needs, without the full factor; a rank holding
    only some blocks can send these two numbers (trace sum, side) instead.
    """
    trace, side = 0.0, 0
    for b in blocks:
        trace += ops.to_float(ops.sum(b) if diagonal else ops.trace(b))
        side += ops.shape(b)[0]
    return trace / side


def pi_correction_blocks(
    ops: ArrayOps, a_blocks: Sequence[Array], g_blocks: Sequence[Array], a_is_diagonal: bool = False
) -> float:
    """``damping.pi_correction`` of factors given as diagonal blocks (equal to the full factors')."""
    ta = blocks_mean_eigenvalue(ops, a_blocks, a_is_diagonal)
    tg = blocks_mean_eigenvalue(ops, g_blocks, False)
    if not (math.isfinite(ta) and math.isfinite(tg)) or ta <= 0.0 or tg <= 0.0:
        return 1.0
    return math.sqrt(ta / tg)


def invert_blocks(
    ops: ArrayOps,
    blocks: Sequence[Array],
    method: InverseMethod,
    damping_share: float = 0.0,
    diagonal: bool = False,
) -> List[FactorInverse]:
    """``inverse.invert_factor`` of every block (each block is its own statistic and task)."""
    return [invert_factor(ops, b, method, damping_share, diagonal=diagonal) for b in blocks]


def _left_block_diag(ops: ArrayOps, mats: Sequence[Array], v: Array, layout: BlockLayout, transpose: bool) -> Array:
    """diag(M_1..M_k)^(T) @ v, one matmul per row slab of v."""
    parts = [ops.matmul(ops.transpose(m) if transpose else m, v[s]) for m, s in zip(mats, layout.slices())]
    return parts[0] if len(parts) == 1 else ops.concat(parts, 0)


def _right_block_diag(ops: ArrayOps, v: Array, mats: Sequence[Array], layout: BlockLayout, transpose: bool) -> Array:
    """v @ diag(M_1..M_k)^(T), one matmul per column slab of v."""
    parts = [ops.matmul(v[:, s], ops.transpose(m) if transpose else m) for m, s in zip(mats, layout.slices())]
    return parts[0] if len(parts) == 1 else ops.concat(parts, 1)


def _concat(ops: ArrayOps, xs: Sequence[Array]) -> Array:
    return xs[0] if len(xs) == 1 else ops.concat(list(xs), 0)


def precondition_block_kronecker(
    ops: ArrayOps,
    grad: Array,
    a_layout: BlockLayout,
    a_invs: Sequence[FactorInverse],
    g_layout: BlockLayout,
    g_invs: Sequence[FactorInverse],
    damping: float,
) -> Array:
    """(diag(A_i) (x) diag(G_j) + damping)^-1 applied to a gradient (g_dim, a_dim).

    Args:
        ops: array backend.
        grad: gradient matrix, rows along G, columns along A.
        a_layout, a_invs: blocks of A and their inverses (one ``FactorInverse`` per block; a
            diagonal A has eigvecs None / a 1-D inverse in every block).
        g_layout, g_invs: the same for G.
        damping: Tikhonov damping (EIGEN; CHOLESKY has it in the inverses already).

    Returns:
        The preconditioned gradient in ``grad``'s dtype. With one block on each side this is
        ``inverse.precondition_kronecker`` itself.

    Raises:
        ValueError: layouts that do not match the gradient or the number of inverses, or
            blocks inverted with different methods.
    """
    rows, cols = ops.shape(grad)
    if (rows, cols) != (g_layout.n, a_layout.n):
        raise ValueError(
            f"precondition_block_kronecker: gradient {rows}x{cols} does not match the G x A block layouts "
            f"{g_layout.n}x{a_layout.n}"
        )
    if len(a_invs) != a_layout.k or len(g_invs) != g_layout.k:
        raise ValueError(
            f"precondition_block_kronecker: {len(a_invs)} A and {len(g_invs)} G inverses for layouts of "
            f"{a_layout.k} and {g_layout.k} blocks"
        )
    methods = {i.method for i in list(a_invs) + list(g_invs)}
    if len(methods) != 1:
        raise ValueError(f"precondition_block_kronecker: blocks inverted with different methods {sorted(methods)}")
    if a_layout.k == 1 and g_layout.k == 1:
        return precondition_kronecker(ops, grad, a_invs[0], g_invs[0], damping)
    method = methods.pop()
    out_dtype = ops.dtype_name(grad)
    a_diagonal = a_invs[0].eigvecs is None if method is InverseMethod.EIGEN else len(ops.shape(a_invs[0].inverse)) == 1
    ref = a_invs[0].eigvals if method is InverseMethod.EIGEN else a_invs[0].inverse
    v = ops.cast(grad, ops.dtype_name(ref))
    if method is InverseMethod.EIGEN:
        g_vecs = [i.eigvecs for i in g_invs]
        v = _left_block_diag(ops, g_vecs, v, g_layout, transpose=True)
        if not a_diagonal:
            v = _right_block_diag(ops, v, [i.eigvecs for i in a_invs], a_layout, transpose=False)
        dg = _concat(ops, [i.eigvals for i in g_invs])
        da = _concat(ops, [i.eigvals for i in a_invs])
        v = v / (ops.reshape(dg, (rows, 1)) * ops.reshape(da, (1, cols)) + damping)
        v = _left_block_diag(ops, g_vecs, v, g_layout, transpose=False)
        if not a_diagonal:
            v = _right_block_diag(ops, v, [i.eigvecs for i in a_invs], a_layout, transpose=True)
    else:
        v = _left_block_diag(ops, [i.inverse for i in g_invs], v, g_layout, transpose=False)
        if a_diagonal:
            v = v * ops.reshape(_concat(ops, [i.inverse for i in a_invs]), (1, cols))
        else:
            v = _right_block_diag(ops, v, [i.inverse for i in a_invs], a_layout, transpose=False)
    return ops.cast(v, out_dtype)
