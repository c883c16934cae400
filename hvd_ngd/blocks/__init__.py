"""Per-layer curvature blocks: what a layer's statistics look like and how they precondition.

One class per kind of block (tensorflow/kfac's split of per-layer blocks from per-statistic
factors): ``KroneckerBlock`` (Linear, Conv2d, Embedding: A (x) G) and ``UnitwiseBlock``
(BatchNorm, LayerNorm: one damped 2x2 Fisher per channel, SP-NGD). A new layer kind is a new
block class plus its capture in the adapters; the engine and the strategies only use the
``CurvatureBlock`` interface.
"""

from __future__ import annotations

from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.blocks.kronecker import KroneckerBlock
from hvd_ngd.blocks.unitwise_block import UnitwiseBlock
from hvd_ngd.enums import InverseMethod
from hvd_ngd.layer_spec import LayerSpec

__all__ = ["CurvatureBlock", "KroneckerBlock", "UnitwiseBlock", "make_block"]


def make_block(spec: LayerSpec, method: InverseMethod, pi_correction: bool) -> CurvatureBlock:
    """The block of one registered layer."""
    if spec.kind.is_unitwise:
        return UnitwiseBlock(spec)
    return KroneckerBlock(spec, method, pi_correction)
