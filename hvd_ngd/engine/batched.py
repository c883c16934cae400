"""Preconditioning of many equally shaped Kronecker blocks with batched matmuls.

Deep networks repeat layer shapes (a 40-layer MLP has 38 identical hidden layers). Their
eigen-basis preconditioning Qg [(Qg^T dW Qa) * D] Qa^T runs as four batched matmuls over a
stack of layers instead of four matmuls per layer. The stacked Qa, Qg and denominators D are
kept until a decomposition or a damping in the group changes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

from hvd_ngd.blocks.kronecker import KroneckerBlock
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array, ArrayOps

GroupKey = Tuple[str, ...]
_TINY = {"float32": 1e-30, "float64": 1e-300}
_FLUSH = 1e-30  # relative to the layer's largest gradient entry: below float32 resolution


def shape_groups(blocks: Sequence[KroneckerBlock]) -> List[List[KroneckerBlock]]:
    """Blocks with identical (g_dim, a_dim) and dense A, in order; singletons included."""
    groups: Dict[Tuple[int, int, bool], List[KroneckerBlock]] = {}
    for block in blocks:
        groups.setdefault((block.spec.g_dim, block.spec.a_dim, block.a_diagonal), []).append(block)
    return list(groups.values())


class BatchedKronecker:
    """Stacked eigen-bases of groups of equally shaped blocks (one cache entry per group)."""

    def __init__(self) -> None:
        self._cache: Dict[GroupKey, tuple] = {}

    def clear(self) -> None:
        """Forget every stacked basis (e.g. after loading a checkpoint)."""
        self._cache.clear()

    def precondition(
        self,
        ops: ArrayOps,
        blocks: Sequence[KroneckerBlock],
        grads: Sequence[Array],
        inverses: Mapping[StatKey, FactorInverse],
        damping: Mapping[str, float],
    ) -> Tuple[List[Array], Array]:
        """Preconditioned gradients of a group, and each one's sum(v * g) (KL clipping and the
        finiteness check of the step), as one vector."""
        key = tuple(b.name for b in blocks)
        sources = tuple((*b.inverse_pair(ops, inverses), damping[b.name]) for b in blocks)
        cached = self._cache.get(key)
        if cached is None or len(cached[0]) != len(sources) or any(
            s[0] is not c[0] or s[1] is not c[1] or s[2] != c[2] for s, c in zip(sources, cached[0])
        ):
            qa = ops.stack([a.eigvecs for a, _, _ in sources], 0)
            qg = ops.stack([g.eigvecs for _, g, _ in sources], 0)
            denom = ops.stack([b.denominator(ops, a, g, d) for b, (a, g, d) in zip(blocks, sources)], 0)
            cached = (sources, qa, qg, ops.transpose(qa), ops.transpose(qg), denom)
            self._cache[key] = cached
        _, qa, qg, qa_t, qg_t, denom = cached
        out_dtype = ops.dtype_name(grads[0])
        g = ops.stack(grads, 0)
        v = ops.cast(g, ops.dtype_name(qa))
        # Preconditioning is linear: run it on g / max|g| so that tiny gradients (vanishing
        # gradients reach float32's subnormal range, where CPU matmuls slow down ~5x) are not
        # subnormal inside the matmuls.
        scale = ops.maximum(ops.amax(ops.abs(v), axis=(1, 2), keepdims=True), _TINY.get(ops.dtype_name(v), 1e-30))
        gs = ops.flush_tiny(v / scale, _FLUSH)
        ps = ops.matmul(ops.matmul(qg, ops.matmul(ops.matmul(qg_t, gs), qa) * denom), qa_t)
        v = ops.cast(ps * scale, out_dtype)
        n = len(blocks)
        # sum(v * g) from the scaled pair (no subnormal products), rescaled per layer
        vg = ops.sum(ops.reshape(ps * gs, (n, -1)), 1) * ops.reshape(scale * scale, (n,))
        return ops.unstack(v), ops.cast(vg, out_dtype)
