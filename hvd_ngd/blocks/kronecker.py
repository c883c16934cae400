"""K-FAC block A (x) G of a Linear, Conv2d or Embedding layer.

Eigen method: A = Qa diag(da) Qa^T, G = Qg diag(dg) Qg^T; the preconditioned gradient is
Qg [(Qg^T dW Qa) * 1/(dg da^T + l)] Qa^T, the exact inverse of A (x) G + l I. The denominator
1/(dg da^T + l) depends only on the decompositions and the damping, so it is kept from the step
it was first needed until one of them changes. Decompositions run on the factor divided by its
mean eigenvalue (trace / dim) and rescale the eigenvalues afterwards: the result is the same, but
factors whose entries are far from 1 (vanishing gradients give G ~ 1e-30) no longer make a
float32 eigensolver fail to converge.

Cholesky method: (A + dA I)^-1 and (G + dG I)^-1 with the pi-corrected damping split.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd import damping as damping_rules
from hvd_ngd import inverse
from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.enums import DampingRule, InverseMethod
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey, Statistic
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps

_TINY = {"float32": 1e-35, "float64": 1e-300}
_SHIFT = 1e-6  # relative to the mean eigenvalue; subtracted from the eigenvalues afterwards


def scaled_eigh(ops: ArrayOps, x: Array) -> Tuple[Array, Array]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix, computed on
    ``x / (trace(x) / n) + shift I`` and mapped back (float64 retry when the solver raises)."""
    n = ops.shape(x)[0]
    dtype = ops.dtype_name(x)
    scale = ops.maximum(ops.trace(x) / float(n), _TINY.get(dtype, 1e-35))
    # A relative shift of the spectrum (removed again below) keeps the solver away from the
    # exactly singular blocks that dead units produce (zero rows and columns): float32 LAPACK
    # eigh returned NaN eigenvectors without raising on such a factor of a 40-layer ReLU MLP.
    shifted = x / scale + ops.eye(n, x) * _SHIFT
    try:
        vals, vecs = ops.eigh(shifted)
    except Exception:  # noqa: BLE001 - the backend's convergence failure; retry wider once
        if dtype == "float64":
            raise
        vals, vecs = ops.eigh(ops.cast(shifted, "float64"))
        vals, vecs = ops.cast(vals, dtype), ops.cast(vecs, dtype)
    return ops.maximum(vals - _SHIFT, 0.0) * scale, vecs


class KroneckerBlock(CurvatureBlock):
    """Statistics ``A`` (a_dim x a_dim, or a vector for Embedding) and ``G`` (g_dim x g_dim).

    Gradient matrix: (out, a_dim) with the bias gradient as the last column (Embedding:
    weight_grad^T).

    A split factor (``a_layout`` / ``g_layout``, from the planner) is kept as its diagonal
    blocks, each its own statistic ``StatKey(layer, A, block)``; preconditioning uses the
    block-diagonal decomposition assembled from the blocks' (EIGEN only).

    Args:
        spec: the layer.
        method: EIGEN or CHOLESKY.
        pi_correction: split Cholesky damping with the pi-correction.
        a_layout / g_layout: ``BlockLayout`` of a split factor, or None.
    """

    def __init__(
        self, spec: LayerSpec, method: InverseMethod, pi_correction: bool, a_layout: Any = None, g_layout: Any = None,
        rule: DampingRule = DampingRule.ABSOLUTE,
    ) -> None:
        self.spec = spec
        self.rule = rule
        self.method = method
        self.pi_correction = pi_correction
        self.a_key = StatKey(spec.name, Statistic.A)
        self.g_key = StatKey(spec.name, Statistic.G)
        self.layouts = {Statistic.A: a_layout, Statistic.G: g_layout}
        self.keys_of = {
            s: [StatKey(spec.name, s, b) for b in range(lay.k)] if lay is not None else [StatKey(spec.name, s)]
            for s, lay in self.layouts.items()
        }
        self.split = a_layout is not None or g_layout is not None
        if self.split and method is not InverseMethod.EIGEN:
            raise ValueError(f"layer {spec.name!r}: factor splitting needs inverse_method='eigen'")
        self.statistics = tuple(self.keys_of[Statistic.A] + self.keys_of[Statistic.G])
        self.a_diagonal = spec.a_is_diagonal
        self._denominator: Optional[Tuple[FactorInverse, FactorInverse, float, Array]] = None
        self._assembled: Dict[Statistic, Tuple[tuple, FactorInverse]] = {}

    # ------------------------------------------------------------------ layout
    def is_symmetric_matrix(self, key: StatKey) -> bool:
        return not (key == self.a_key and self.a_diagonal)

    def _side(self, key: StatKey) -> int:
        layout = self.layouts[key.statistic]
        if key.block >= 0:
            return layout.sizes[key.block]
        return self.spec.a_dim if key.statistic is Statistic.A else self.spec.g_dim

    def shape(self, key: StatKey) -> Tuple[int, ...]:
        n = self._side(key)
        return (n,) if self._diagonal(key) else (n, n)

    def split_statistic(self, ops: ArrayOps, statistic: Statistic, value: Array) -> List[Tuple[StatKey, Array]]:
        """The statistics a captured batch factor feeds: itself, or its diagonal blocks."""
        layout = self.layouts[statistic]
        if layout is None:
            return [(self.keys_of[statistic][0], value)]
        diagonal = statistic is Statistic.A and self.a_diagonal
        return [(k, value[s] if diagonal else value[s, s]) for k, s in zip(self.keys_of[statistic], layout.slices())]

    @property
    def inverted(self) -> Tuple[StatKey, ...]:
        return self.statistics

    def _diagonal(self, key: StatKey) -> bool:
        return key.statistic is Statistic.A and self.a_diagonal

    # ------------------------------------------------------------------ inverses
    def invert(self, ops: ArrayOps, key: StatKey, factors: Mapping[StatKey, Array], damping: float) -> FactorInverse:
        """Decompose (EIGEN) or invert with the damping share (CHOLESKY) one factor.

        Raises:
            Exception: the backend's linear-algebra error when the decomposition fails.
        """
        factor = factors[key]
        x = ops.cast(factor, inverse.compute_dtype(ops, factor))
        diagonal = self._diagonal(key)
        if self.method is InverseMethod.EIGEN:
            if diagonal:
                return FactorInverse(self.method, eigvals=ops.maximum(x, 0.0))
            vals, vecs = scaled_eigh(ops, x)
            return FactorInverse(self.method, eigvals=vals, eigvecs=ops.flush_tiny(vecs, 1e-30))
        da, dg = damping_rules.cholesky_damping(
            ops, factors[self.a_key], factors[self.g_key], damping, self.pi_correction, a_is_diagonal=self.a_diagonal,
            rule=self.rule,
        )
        share = da if key.statistic is Statistic.A else dg
        return inverse.invert_factor(ops, x, self.method, share, diagonal=diagonal)

    def inverse_template(self, ops: ArrayOps, key: StatKey, like: Array) -> List[Array]:
        n = self._side(key)
        like = ops.cast(like, inverse.compute_dtype(ops, like))
        diagonal = self._diagonal(key)
        if self.method is InverseMethod.EIGEN:
            vals = ops.zeros((n,), like)
            return [vals] if diagonal else [vals, ops.zeros((n, n), like)]
        return [ops.zeros((n,) if diagonal else (n, n), like)]

    def rebuild_inverse(self, ops: ArrayOps, key: StatKey, tensors: List[Array]) -> FactorInverse:
        return inverse.inverse_from_tensors(ops, self.method, self._diagonal(key), tensors)

    def has_curvature(self, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse]) -> bool:
        return all(k in inverses for k in self.statistics)

    def inverse_pair(self, ops: ArrayOps, inverses: Mapping[StatKey, FactorInverse]) -> Tuple[FactorInverse, FactorInverse]:
        """The (A, G) decompositions; a split factor's are assembled block-diagonally from its
        blocks' (kept until a block's decomposition changes)."""
        return self._whole(ops, Statistic.A, inverses), self._whole(ops, Statistic.G, inverses)

    def _whole(self, ops: ArrayOps, statistic: Statistic, inverses: Mapping[StatKey, FactorInverse]) -> FactorInverse:
        keys = self.keys_of[statistic]
        if self.layouts[statistic] is None:
            return inverses[keys[0]]
        parts = tuple(inverses[k] for k in keys)
        cached = self._assembled.get(statistic)
        if cached is not None and len(cached[0]) == len(parts) and all(a is b for a, b in zip(cached[0], parts)):
            return cached[1]
        vals = ops.concat([p.eigvals for p in parts], 0)
        vecs = None
        if parts[0].eigvecs is not None:
            n = sum(ops.shape(p.eigvals)[0] for p in parts)
            rows, offset = [], 0
            for p in parts:
                s = ops.shape(p.eigvals)[0]
                pieces = [ops.zeros((s, offset), p.eigvecs)] if offset else []
                pieces.append(p.eigvecs)
                if n - offset - s:
                    pieces.append(ops.zeros((s, n - offset - s), p.eigvecs))
                rows.append(ops.concat(pieces, 1) if len(pieces) > 1 else pieces[0])
                offset += s
            vecs = ops.concat(rows, 0)
        whole = FactorInverse(self.method, eigvals=vals, eigvecs=vecs)
        self._assembled[statistic] = (parts, whole)
        return whole

    # ------------------------------------------------------------------ preconditioning
    def denominator(self, ops: ArrayOps, a_inv: FactorInverse, g_inv: FactorInverse, damping: float) -> Array:
        """1 / (dg da^T + damping), kept until a decomposition or the damping changes."""
        cached = self._denominator
        if cached is not None and cached[0] is a_inv and cached[1] is g_inv and cached[2] == damping:
            return cached[3]
        rows, cols = ops.shape(g_inv.eigvals)[0], ops.shape(a_inv.eigvals)[0]
        lam = damping_rules.kronecker_damping(ops, a_inv.eigvals, g_inv.eigvals, damping, self.rule)
        denom = 1.0 / (ops.reshape(g_inv.eigvals, (rows, 1)) * ops.reshape(a_inv.eigvals, (1, cols)) + lam)
        self._denominator = (a_inv, g_inv, damping, denom)
        return denom

    def precondition(
        self,
        ops: ArrayOps,
        grad: Array,
        factors: Mapping[StatKey, Array],
        inverses: Dict[StatKey, FactorInverse],
        damping: float,
    ) -> Array:
        if self.method is not InverseMethod.EIGEN:
            a_inv, g_inv = self.inverse_pair(ops, inverses)
            return inverse.precondition_kronecker(ops, grad, a_inv, g_inv, damping)
        return self.apply(ops, grad, self.operands(ops, factors, inverses, damping))

    # ------------------------------------------------------------------ frozen curvature
    def operand_shapes(self) -> Optional[List[Tuple[int, ...]]]:
        """(Qg, Qa, denominator), or (Qg, denominator) for a diagonal A; None for Cholesky."""
        if self.method is not InverseMethod.EIGEN:
            return None
        g, a = self.spec.g_dim, self.spec.a_dim
        return [(g, g), (g, a)] if self.a_diagonal else [(g, g), (a, a), (g, a)]

    def operands(
        self, ops: ArrayOps, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse], damping: float
    ) -> Tuple[Array, ...]:
        """The eigen-bases and the kept denominator 1 / (dg da^T + damping) (EIGEN only)."""
        a_inv, g_inv = self.inverse_pair(ops, inverses)
        denom = self.denominator(ops, a_inv, g_inv, damping)
        if a_inv.eigvecs is None:
            return (g_inv.eigvecs, denom)
        return (g_inv.eigvecs, a_inv.eigvecs, denom)

    def apply(self, ops: ArrayOps, grad: Array, operands: Sequence[Array]) -> Array:
        """Qg [(Qg^T dW Qa) * denominator] Qa^T (Qa omitted for a diagonal A)."""
        qg, denom = operands[0], operands[-1]
        qa = operands[1] if len(operands) == 3 else None
        out_dtype = ops.dtype_name(grad)
        v = ops.cast(grad, ops.dtype_name(qg))
        # Linear in the gradient: work on g / max|g| so tiny gradients are not subnormal inside
        # the matmuls (see ``engine.batched``).
        scale = ops.maximum(ops.amax(ops.abs(v)), _TINY.get(ops.dtype_name(v), 1e-35))
        v = ops.matmul(ops.transpose(qg), ops.flush_tiny(v / scale, 1e-30))
        if qa is not None:
            v = ops.matmul(v, qa)
        v = ops.matmul(qg, v * denom)
        if qa is not None:
            v = ops.matmul(v, ops.transpose(qa))
        return ops.cast(v * scale, out_dtype)
