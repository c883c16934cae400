"""Per-layer curvature blocks, and the block-diagonal splitting of large factors.

One class per kind of block (tensorflow/kfac's split of per-layer blocks from per-statistic
factors): ``KroneckerBlock`` (Linear, Conv2d, Embedding: A (x) G) and ``UnitwiseBlock``
(BatchNorm, LayerNorm: one damped 2x2 Fisher per channel, SP-NGD). A new layer kind is a new
block class plus its capture in the adapters; the engine and the strategies only use the
``CurvatureBlock`` interface.

Factor splitting (``layout``, ``block_diagonal``): a factor of side n cut into k diagonal blocks
(``BlockLayout``), each block its own statistic with its own owner, inverse and refresh schedule;
preconditioning with the blocks is exact for the block-diagonal factors (k = 1 is K-FAC).
"""

from __future__ import annotations

from typing import Any

from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.blocks.block_diagonal import (
    block_gram,
    blocks_mean_eigenvalue,
    extract_blocks,
    invert_blocks,
    pi_correction_blocks,
    precondition_block_kronecker,
)
from hvd_ngd.blocks.kronecker import KroneckerBlock
from hvd_ngd.blocks.layout import BlockLayout, block_layout
from hvd_ngd.blocks.unitwise_block import UnitwiseBlock
from hvd_ngd.enums import DampingRule, InverseMethod
from hvd_ngd.layer_spec import LayerSpec

__all__ = [
    "BlockLayout",
    "CurvatureBlock",
    "KroneckerBlock",
    "UnitwiseBlock",
    "block_gram",
    "block_layout",
    "blocks_mean_eigenvalue",
    "extract_blocks",
    "invert_blocks",
    "make_block",
    "pi_correction_blocks",
    "precondition_block_kronecker",
]


def make_block(
    spec: LayerSpec, method: InverseMethod, pi_correction: bool, a_layout: Any = None, g_layout: Any = None,
    rule: DampingRule = DampingRule.ABSOLUTE,
) -> CurvatureBlock:
    """The block of one registered layer (``a_layout`` / ``g_layout``: ``BlockLayout`` of a
    split factor, from the planner)."""
    if spec.kind.is_unitwise:
        return UnitwiseBlock(spec, rule)
    return KroneckerBlock(spec, method, pi_correction, a_layout, g_layout, rule)
