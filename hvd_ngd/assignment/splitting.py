"""Choosing the number of diagonal blocks per factor (factor splitting) for a world size.

Once ranks outnumber the layers, the largest factors bound the curvature makespan: one
4608-wide decomposition of ResNet-50 takes longer than a 1,024-rank share of all the work.
Cutting a factor of side n into k blocks (a block-diagonal approximation) makes k tasks of side
~n/k that can run on k ranks, and less work in all (k (n/k)^3 = n^3 / k^2).

The rule: for a threshold ``tau`` on the cost of one block, every factor takes the fewest
blocks whose largest costs at most ``tau`` (within ``max_blocks`` and ``min_block_size``).
Thresholds are tried from no splitting downwards, and the scan stops at the first whose blocks
that could still be cut are all within ``min_share`` (default 1) times the fair share (total
work / ranks, after splitting): factors are cut to balance the ranks, never just to do less
work (at one rank nothing is split; ResNet-50 is not split below 8 ranks). Among the thresholds
tried, the plan with the smallest LPT makespan wins; ties within ``tolerance`` go to the larger
threshold (fewer, larger blocks: a closer approximation). When that plan's makespan is still
above ``max_ratio`` times its lower bound (bin-packing granularity: 48 equal factors on 32
ranks), the share is halved, up to three times.
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
        max_ratio: makespan / lower bound above which smaller blocks are allowed (the share
            halved, up to three times).
    """

    max_blocks: int = 64
    min_block_size: int = 512
    min_share: float = 1.0
    tolerance: float = 0.02
    max_ratio: float = 1.1

    def __post_init__(self) -> None:
        for name in ("max_blocks", "min_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid SplitPolicy.{name}={value!r}: must be an int >= 1")
        if not (0.0 < self.min_share <= 1.0) or not math.isfinite(self.min_share):
            raise ValueError(f"invalid SplitPolicy.min_share={self.min_share!r}: must be in (0, 1]")
        if not (0.0 <= self.tolerance < 1.0):
            raise ValueError(f"invalid SplitPolicy.tolerance={self.tolerance!r}: must be in [0, 1)")
        if not self.max_ratio >= 1.0:
            raise ValueError(f"invalid SplitPolicy.max_ratio={self.max_ratio!r}: must be >= 1")

    def max_blocks_for(self, size: int) -> int:
        """Most blocks a dense factor of side ``size`` may take."""
        return max(1, min(self.max_blocks, size // self.min_block_size))
