"""Batch statistics from captured tensors, dispatched on the layer kind.

Adapters capture framework tensors in a canonical layout and call these functions; all factor
math lives in ``hvd_ngd.factors`` / ``hvd_ngd.unitwise``.

Canonical layouts:
    LINEAR: activations (N, in), output gradients (N, out) (sequence dims folded into N).
    CONV2D: im2col patches (N, L, in_ch*kh*kw), output gradients (N, L, out).
    EMBEDDING: integer ids (any shape), output gradients (rows, dim).
    BATCHNORM / LAYERNORM: normalized input x_hat and output gradients, both (N, C, L).
"""

from __future__ import annotations

from typing import Any

from hvd_ngd import factors, unitwise
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps


def a_statistic(ops: ArrayOps, spec: LayerSpec, a: Array, like: Any = None) -> Array:
    """The batch A factor of a Kronecker-factored layer.

    Args:
        ops: array backend.
        spec: the layer.
        a: captured input in the canonical layout of ``spec.kind``.
        like: float tensor giving dtype/device (Embedding only, whose ``a`` holds integers).
    """
    if spec.kind is LayerKind.LINEAR:
        return factors.linear_a_factor(ops, a, spec.has_bias)
    if spec.kind is LayerKind.CONV2D:
        return factors.conv2d_a_factor(ops, a, spec.has_bias)
    if spec.kind is LayerKind.EMBEDDING:
        return factors.embedding_a_factor(ops, a, spec.in_features, like)
    raise ValueError(f"layer {spec.name!r} of kind {spec.kind.value} has no A factor")


def g_statistic(ops: ArrayOps, spec: LayerSpec, g: Array, grad_scale: float) -> Array:
    """The batch G factor from output gradients (scaled to gradients of the summed loss)."""
    if spec.kind in (LayerKind.LINEAR, LayerKind.EMBEDDING):
        return factors.linear_g_factor(ops, g, grad_scale)
    if spec.kind is LayerKind.CONV2D:
        return factors.conv2d_g_factor(ops, g, grad_scale)
    raise ValueError(f"layer {spec.name!r} of kind {spec.kind.value} has no G factor")


def f_statistic(ops: ArrayOps, spec: LayerSpec, x_hat: Array, g: Array, grad_scale: float) -> Array:
    """The batch unit-wise (C, 3) Fisher blocks of a BatchNorm/LayerNorm layer."""
    if not spec.kind.is_unitwise:
        raise ValueError(f"layer {spec.name!r} of kind {spec.kind.value} is not unit-wise")
    return unitwise.unitwise_fisher(ops, x_hat, g, grad_scale)
