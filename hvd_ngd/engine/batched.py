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


def shape_groups(blocks: Sequence[KroneckerBlock]) -> List[List[KroneckerBlock]]:
    """Blocks with identical (g_dim, a_dim) and dense A, in order; singletons included."""
    groups: Dict[Tuple[int, int, bool], List[KroneckerBlock]] = {}
    for block in blocks:
        groups.setdefault((block.spec.g_dim, block.spec.a_dim, block.a_diagonal), []).append(block)
    return list(groups.values())


class BatchedKronecker:
    """Stacked eigen-bases of groups of equally shaped blocks (one cache entry per group)."""

    def __init__(self) -> None:
        self._cache: Dict[GroupKey, Tuple[tuple, Array, Array, Array, Array]] = {}

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
        sources = tuple((inverses[b.a_key], inverses[b.g_key], damping[b.name]) for b in blocks)
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
        v = ops.matmul(ops.matmul(qg_t, v), qa)
        v = ops.matmul(ops.matmul(qg, v * denom), qa_t)
        v = ops.cast(v, out_dtype)
        vg = ops.sum(ops.reshape(v * g, (len(blocks), -1)), 1)
        return [v[i] for i in range(len(blocks))], vg
