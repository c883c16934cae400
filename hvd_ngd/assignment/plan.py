"""The result of planning: who inverts each statistic block, who preconditions each layer."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Tuple

from hvd_ngd.blocks.layout import BlockLayout


class TaskKey(NamedTuple):
    """A statistic task: block ``block`` of statistic ``statistic`` ("A", "G", "F") of ``layer``.

    Unsplit statistics are block 0 of a one-block layout.
    """

    layer: str
    statistic: str
    block: int = 0

    def __str__(self) -> str:
        return f"{self.layer}/{self.statistic}/{self.block}"


@dataclasses.dataclass(frozen=True)
class BlockTask:
    """One statistic block to compute, invert and send, with its owner.

    Attributes:
        key: which block.
        offset: first row/column of the block in its factor.
        size: side of the block.
        diagonal: a diagonal factor (or the unit-wise F blocks): ``size`` entries.
        cost: its inverse cost under the plan's cost model (seconds with a measured model).
        owner: rank that inverts it.
    """

    key: TaskKey
    offset: int
    size: int
    diagonal: bool
    cost: float
    owner: int


@dataclasses.dataclass
class AssignmentPlan:
    """Result of ``assign``.

    Attributes:
        inverse_worker: (layer, statistic) -> rank computing that inverse (for a statistic split
            into blocks: the rank of its block 0; ``owner(layer, statistic, block)`` has each).
        layer_owner: layer -> rank preconditioning the layer's gradient: the worker of its G
            factor's block 0 (or F), since G is the factor applied first.
        loads: summed cost per rank (inverse work, plus preconditioning with a measured model).
        layouts: (layer, statistic) -> its block layout (one block unless split).
        tasks: every statistic block with its owner, in planning order (largest first).
        precondition_cost: layer -> cost of preconditioning it (0 without a measured model).
        largest_unit: cost of the largest unit of work placed (a block, possibly bundled with
            its layer's preconditioning or, unsplit, with the layer's other factor).
    """

    inverse_worker: Dict[Tuple[str, str], int]
    layer_owner: Dict[str, int]
    loads: List[float]
    layouts: Dict[Tuple[str, str], BlockLayout] = dataclasses.field(default_factory=dict)
    tasks: List[BlockTask] = dataclasses.field(default_factory=list)
    precondition_cost: Dict[str, float] = dataclasses.field(default_factory=dict)
    largest_unit: float = 0.0

    def __post_init__(self) -> None:
        self._block_owner: Dict[TaskKey, int] = {t.key: t.owner for t in self.tasks}

    @property
    def max_mean_load(self) -> float:
        """max(load) / mean(load); 1.0 is perfect balance."""
        mean = sum(self.loads) / len(self.loads) if self.loads else 0.0
        return max(self.loads) / mean if mean > 0 else 1.0

    @property
    def makespan(self) -> float:
        """The busiest rank's load: the predicted curvature time of one step (with a model)."""
        return max(self.loads) if self.loads else 0.0

    @property
    def lower_bound(self) -> float:
        """max(largest single unit of work, total work / ranks): no plan of these units beats it."""
        if not self.loads:
            return 0.0
        return max(self.largest_unit, sum(self.loads) / len(self.loads))

    @property
    def makespan_ratio(self) -> float:
        """makespan / lower bound; 1.0 is optimal."""
        bound = self.lower_bound
        return self.makespan / bound if bound > 0 else 1.0

    def blocks(self, layer: str, statistic: str) -> BlockLayout:
        """Block layout of one statistic."""
        return self.layouts[(layer, statistic)]

    def owner(self, layer: str, statistic: str, block: Optional[int] = None) -> int:
        """Rank computing the inverse of one statistic (or of one of its blocks).

        Raises:
            ValueError: the statistic is split into several blocks and ``block`` is None.
        """
        if block is None:
            layout = self.layouts.get((layer, statistic))
            if layout is not None and layout.k > 1:
                raise ValueError(
                    f"statistic {layer}/{statistic} is split into {layout.k} blocks: pass block=0..{layout.k - 1}"
                )
            return self.inverse_worker[(layer, statistic)]
        if not self._block_owner:  # a plan built without tasks
            if block != 0:
                raise KeyError(TaskKey(layer, statistic, block))
            return self.inverse_worker[(layer, statistic)]
        return self._block_owner[TaskKey(layer, statistic, block)]

    def layers_of(self, rank: int) -> List[str]:
        """Layers whose gradient ``rank`` preconditions, sorted."""
        return sorted(n for n, r in self.layer_owner.items() if r == rank)

    def tasks_of(self, rank: int) -> List[BlockTask]:
        """The statistic blocks ``rank`` inverts, sorted by key."""
        return sorted((t for t in self.tasks if t.owner == rank), key=lambda t: t.key)

    def statistic_elements(self, packed: bool = True) -> int:
        """Elements of all statistic blocks (what a factor allreduce sends once, per rank): a
        dense block of side s is s(s+1)/2 packed (s^2 not), a diagonal factor its side, the
        unit-wise F blocks 3 per unit. Splitting keeps only the diagonal blocks."""
        total = 0
        for t in self.tasks:
            if t.key.statistic == "F":
                total += 3 * t.size
            elif t.diagonal:
                total += t.size
            else:
                total += t.size * (t.size + 1) // 2 if packed else t.size * t.size
        return total

    def split_statistics(self) -> Dict[Tuple[str, str], int]:
        """(layer, statistic) -> number of blocks, for the statistics cut into more than one."""
        return {key: lay.k for key, lay in self.layouts.items() if lay.k > 1}
