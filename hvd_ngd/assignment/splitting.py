"""Choosing the number of diagonal blocks per factor (factor splitting) for a world size.

Once ranks outnumber the layers, the largest factors bound the curvature makespan: one
4608-wide decomposition of ResNet-50 takes longer than a 1,024-rank share of all the work.
Cutting a factor of side n into k blocks (a block-diagonal approximation) makes k tasks of side
~n/k that can run on k ranks, and less work in all (k (n/k)^3 = n^3 / k^2).

The rule: for a threshold ``tau`` on the cost of one block, every factor takes the fewest
blocks whose largest costs at most ``tau`` (within ``max_blocks`` and ``min_block_size``).
Only thresholds at least ``min_share`` (default 1) times the fair share (total work / ranks, after
splitting) are considered, so factors are cut to balance the ranks and never just to do less
work (at one rank nothing is split). Among those, the plan with the smallest LPT makespan wins;
ties within ``tolerance`` go to the larger threshold (fewer, larger blocks: a closer
approximation).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
    """Options of factor splitting (``assign(..., split=SplitPolicy())``).

    Attributes:
        max_blocks: most blocks per factor.
        min_block_size: smallest block side (a factor of side n gets at most n // min_block_size
            blocks; smaller factors are never split).
        min_share: smallest block cost considered, as a fraction of the fair share.
        tolerance: relative makespan loss accepted for fewer blocks.
    """

    max_blocks: int = 64
    min_block_size: int = 512
    min_share: float = 1.0
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        for name in ("max_blocks", "min_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid SplitPolicy.{name}={value!r}: must be an int >= 1")
        if not (0.0 < self.min_share <= 1.0) or not math.isfinite(self.min_share):
            raise ValueError(f"invalid SplitPolicy.min_share={self.min_share!r}: must be in (0, 1]")
        if not (0.0 <= self.tolerance < 1.0):
            raise ValueError(f"invalid SplitPolicy.tolerance={self.tolerance!r}: must be in [0, 1)")

    def max_blocks_for(self, size: int) -> int:
        """Most blocks a dense factor of side ``size`` may take."""
        return max(1, min(self.max_blocks, size // self.min_block_size))
