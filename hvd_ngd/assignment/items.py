"""The work items of a plan (one per statistic to invert) and their unit costs without a model.

Cost per work item of side n without a measured model: COMPUTE ~ n^3 (eigendecomposition /
inverse), MEMORY ~ n^2; diagonal factors and unit-wise blocks ~ n. COMMUNICATION balances whole
layers by the size of their gradients, which is what SP-NGD's padded reduce-scatter and
all-gather move every step.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

from hvd_ngd.enums import AssignmentCost
from hvd_ngd.layer_spec import LayerSpec


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One statistic to invert: "A", "G", or "F" (the unit-wise blocks of a BN/LN layer)."""

    layer: str
    statistic: str
    size: int
    diagonal: bool = False

    @property
    def splittable(self) -> bool:
        """Whether factor splitting may cut it into blocks (dense Kronecker factors only)."""
        return not self.diagonal and self.statistic in ("A", "G")


def work_items(specs: Sequence[LayerSpec]) -> List[WorkItem]:
    """A and G of every K-FAC layer, F of every unit-wise layer."""
    items: List[WorkItem] = []
    for s in specs:
        if s.kind.is_unitwise:
            items.append(WorkItem(s.name, "F", s.out_features, diagonal=True))
        else:
            items.append(WorkItem(s.name, "A", s.a_dim, diagonal=s.a_is_diagonal))
            items.append(WorkItem(s.name, "G", s.g_dim))
    return items


def item_cost(item: WorkItem, cost: AssignmentCost) -> float:
    """Cost of one item under the cost model.

    Args:
        item: the work item (side ``n``).
        cost: COMPUTE: n^3 (a decomposition); MEMORY (and COMMUNICATION, per item): n^2.
            Diagonal factors and unit-wise blocks cost n under every model.
    """
    return side_cost(item.size, item.diagonal, cost)


def side_cost(n: int, diagonal: bool, cost: AssignmentCost) -> float:
    """``item_cost`` of a factor or block of side ``n``."""
    cost = AssignmentCost(cost)
    n = float(n)
    if diagonal:
        return n
    return n**3 if cost is AssignmentCost.COMPUTE else n**2


def layer_gradient_elements(spec: LayerSpec) -> int:
    """Elements of a layer's gradient matrix (what SP-NGD reduce-scatters and all-gathers)."""
    return 2 * spec.out_features if spec.kind.is_unitwise else spec.g_dim * spec.a_dim


def communication_elements(n: int, packed: bool) -> int:
    """Elements sent for an n x n symmetric factor: n^2, or n(n+1)/2 packed."""
    return n * (n + 1) // 2 if packed else n * n
