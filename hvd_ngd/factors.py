"""Kronecker factors A = E[a a^T] and G = E[g g^T] of K-FAC layers.

Conventions (all adapters follow them; tests check them against dense Fisher blocks):
    * Linear: ``a`` is (N, in) with sequence dimensions folded into N; with a bias a column of
      ones is appended. A = a^T a / N, G = g^T g / N.
    * Conv2d (KFC, Grosse & Martens 2016): ``a`` holds im2col patches (N, L, d) for the L output
      locations; A averages over samples *and* locations, A = sum_{n,l} a a^T / (N L); G sums
      over locations and averages over samples, G = sum_{n,l} g g^T / N. Only the product
      A (x) G matters; this split keeps both factors O(1).
    * Embedding: A is diagonal (token frequencies), returned as a vector; G as for Linear.
    * ``g`` must be gradients of the *summed* loss: ``grad_scale`` multiplies the captured output
      gradients (adapters pass the local batch size when the loss is a mean).
"""

from __future__ import annotations

from typing import Any

from hvd_ngd.ops.base import Array, ArrayOps


def _append_ones(ops: ArrayOps, a: Array) -> Array:
    shape = ops.shape(a)
    return ops.concat([a, ops.ones(shape[:-1] + (1,), a)], len(shape) - 1)


def _gram(ops: ArrayOps, x: Array) -> Array:
    """x^T x of a 2-D array."""
    return ops.matmul(ops.transpose(x), x)


def linear_a_factor(ops: ArrayOps, a: Array, has_bias: bool) -> Array:
    """A = a^T a / N for activations (N, in) (ones column appended when ``has_bias``)."""
    if has_bias:
        a = _append_ones(ops, a)
    return _gram(ops, a) / ops.shape(a)[0]


def linear_g_factor(ops: ArrayOps, g: Array, grad_scale: float = 1.0) -> Array:
    """G = (s g)^T (s g) / N for output gradients (N, out)."""
    return _gram(ops, g) * (grad_scale * grad_scale / ops.shape(g)[0])


def conv2d_a_factor(ops: ArrayOps, patches: Array, has_bias: bool) -> Array:
    """A = sum_{n,l} a a^T / (N L) for im2col patches (N, L, d)."""
    n, l, d = ops.shape(patches)
    flat = ops.reshape(patches, (n * l, d))
    return linear_a_factor(ops, flat, has_bias)


def conv2d_g_factor(ops: ArrayOps, g: Array, grad_scale: float = 1.0) -> Array:
    """G = sum_{n,l} (s g)(s g)^T / N for output gradients (N, L, out)."""
    n, l, c = ops.shape(g)
    flat = ops.reshape(g, (n * l, c))
    return _gram(ops, flat) * (grad_scale * grad_scale / n)


def embedding_a_factor(ops: ArrayOps, ids: Array, num_embeddings: int, like: Any) -> Array:
    """Diagonal of E[onehot onehot^T]: token counts / number of ids, a vector."""
    counts = ops.bincount(ids, num_embeddings, like)
    total = 1
    for d in ops.shape(ids):
        total *= d
    return counts / max(total, 1)


def embedding_g_factor(ops: ArrayOps, g: Array, grad_scale: float = 1.0) -> Array:
    """G of an Embedding from output gradients (rows, dim): as for Linear."""
    return linear_g_factor(ops, g, grad_scale)
