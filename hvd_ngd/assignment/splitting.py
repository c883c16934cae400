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
from typing import Dict, List, Sequence, Tuple

from hvd_ngd.assignment.items import WorkItem
from hvd_ngd.assignment.units import Costs, build_units, lpt
from hvd_ngd.blocks.layout import BlockLayout, block_layout


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


def choose_layouts(
    items: Sequence[WorkItem], world_size: int, costs: Costs, split_factors: bool, policy: SplitPolicy
) -> Dict[Tuple[str, str], BlockLayout]:
    """Blocks per factor by the rule of ``hvd_ngd.assignment.splitting``."""
    whole = {(i.layer, i.statistic): block_layout(i.size, 1) for i in items}
    options: Dict[int, List[Tuple[int, float]]] = {}  # side -> [(k, cost of its largest block)]
    for i in items:
        if i.splittable and i.size not in options:
            options[i.size] = [(k, costs.block(-(-i.size // k), False, i.statistic))
                               for k in range(1, policy.max_blocks_for(i.size) + 1)]

    def layouts_for(tau: float) -> Tuple[Dict[Tuple[str, str], BlockLayout], float]:
        """Layouts of threshold tau, and the largest block of a factor that could be cut further."""
        out = dict(whole)
        open_max = 0.0
        for i in items:
            if i.splittable:
                opts = options[i.size]
                j = next((j for j, (_, c) in enumerate(opts) if c <= tau), len(opts) - 1)
                if opts[j][0] > 1:
                    out[(i.layer, i.statistic)] = block_layout(i.size, opts[j][0])
                if j < len(opts) - 1:
                    open_max = max(open_max, opts[j][1])
        return out, open_max

    taus = sorted({c for opts in options.values() for _, c in opts}, reverse=True)

    def best_for(share: float):
        """(makespan / lower bound, layouts) of the best plan among the thresholds from no
        splitting down to the first whose cuttable blocks are all within share * fair."""
        scored = []
        for tau in [math.inf] + taus:
            layouts, open_max = layouts_for(tau)
            units, _ = build_units(items, layouts, costs, split_factors, named=False)
            fair = sum(u[0] for u in units) / world_size
            estimate = max(max((u[0] for u in units), default=0.0), fair)
            scored.append((estimate, tau, layouts, units))
            if open_max <= share * fair:
                break  # balanced enough: smaller blocks would only shed work (and accuracy)
        best_estimate = min(s[0] for s in scored)
        shortlist = sorted((s for s in scored if s[0] <= 1.5 * best_estimate), key=lambda s: s[0])[:24]
        evaluated = []
        for _, tau, layouts, units in shortlist:
            makespan = max(lpt(units, world_size)[1])
            bound = max(max((u[0] for u in units), default=0.0), sum(u[0] for u in units) / world_size)
            evaluated.append((makespan, tau, layouts, makespan / bound if bound > 0 else 1.0))
        best = min(e[0] for e in evaluated)
        pick = max((e for e in evaluated if e[0] <= (1.0 + policy.tolerance) * best), key=lambda e: e[1])
        return pick[3], pick[2]

    share = policy.min_share
    ratio, layouts = best_for(share)
    for _ in range(3):  # bin-packing granularity (e.g. 48 equal factors on 32 ranks): cut finer
        if ratio <= policy.max_ratio:
            break
        share /= 2
        ratio, layouts = best_for(share)
    return layouts
