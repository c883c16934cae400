"""Factor splitting: block-diagonal approximations of large Kronecker factors.

A factor of side n is cut into k diagonal blocks (``BlockLayout``); each block is its own
statistic with its own owner, inverse and refresh schedule, and preconditioning with the blocks
is exact for the block-diagonal factors (k = 1 is today's K-FAC).
"""

from hvd_ngd.blocks.block_diagonal import (
    block_gram,
    blocks_mean_eigenvalue,
    extract_blocks,
    invert_blocks,
    pi_correction_blocks,
    precondition_block_kronecker,
)
from hvd_ngd.blocks.layout import BlockLayout, block_layout

__all__ = [
    "BlockLayout",
    "block_gram",
    "block_layout",
    "blocks_mean_eigenvalue",
    "extract_blocks",
    "invert_blocks",
    "pi_correction_blocks",
    "precondition_block_kronecker",
]
