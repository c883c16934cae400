"""Units of planned work and the greedy longest-processing-time (LPT) schedule of them.

A unit is what LPT places on one rank: a statistic block, or several bundled (a layer's
preconditioning goes with its G block 0 or F, whose owner preconditions the layer; without
``split_factors`` block 0 of A goes there too). Each unit, largest first, goes to the
least-loaded rank; ties are broken by names and rank numbers.
"""

from __future__ import annotations

import heapq
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd.assignment.items import WorkItem, side_cost
from hvd_ngd.assignment.plan import TaskKey
from hvd_ngd.blocks.layout import BlockLayout
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import AssignmentCost
from hvd_ngd.layer_spec import LayerSpec

Unit = Tuple[float, str, Tuple[TaskKey, ...]]


class Costs:
    """Block and preconditioning costs under one cost model (n^3 / n^2 guess without a
    measured ``CostModel``), cached by shape."""

    def __init__(self, specs: Sequence[LayerSpec], cost: AssignmentCost, model: Optional[CostModel]) -> None:
        self.cost, self.model = cost, model
        self.specs = {s.name: s for s in specs}
        self._block: Dict[Tuple[int, bool, str], float] = {}
        self._pre: Dict[Tuple[str, Tuple[int, ...], Tuple[int, ...]], float] = {}

    def block(self, size: int, diagonal: bool, statistic: str) -> float:
        key = (size, diagonal, statistic)
        if key not in self._block:
            if self.model is None:
                value = side_cost(size, diagonal, self.cost)
            elif statistic == "F":
                value = self.model.unitwise_seconds(size)
            else:
                value = self.model.inverse_seconds(size, diagonal)
            self._block[key] = value
        return self._block[key]

    def precondition(self, layer: str, layouts: Mapping[Tuple[str, str], BlockLayout]) -> float:
        if self.model is None:
            return 0.0
        spec = self.specs[layer]
        if spec.kind.is_unitwise:
            return self.model.unitwise_seconds(spec.out_features)
        a, g = layouts[(layer, "A")].sizes, layouts[(layer, "G")].sizes
        key = (layer, a, g)
        if key not in self._pre:
            self._pre[key] = self.model.precondition_seconds(g, a, spec.a_is_diagonal)
        return self._pre[key]


def build_units(
    items: Sequence[WorkItem],
    layouts: Mapping[Tuple[str, str], BlockLayout],
    costs: Costs,
    split_factors: bool,
    named: bool,
) -> Tuple[List[Unit], Dict[str, float]]:
    """Units of work (cost, tie-break name, block keys) and each layer's preconditioning cost."""
    units: List[Unit] = []
    pre: Dict[str, float] = {}
    layer_unit: Dict[str, List] = {}
    for item in items:
        lay = layouts[(item.layer, item.statistic)]
        if item.layer not in pre:
            pre[item.layer] = costs.precondition(item.layer, layouts)
        for b, size in enumerate(lay.sizes):
            c = costs.block(size, item.diagonal, item.statistic)
            key = TaskKey(item.layer, item.statistic, b) if named else None
            bundle = b == 0 and (not split_factors or item.statistic in ("G", "F"))
            if bundle:
                unit = layer_unit.setdefault(item.layer, [pre[item.layer], []])
                unit[0] += c
                unit[1].append(key)
            else:
                units.append((c, f"{item.layer}/{item.statistic}/{b}" if named else "", (key,)))
    for layer, (c, keys) in layer_unit.items():
        units.append((c, f"{layer}/{keys[0].statistic}/0" if named else "", tuple(keys)))
    return units, pre


def lpt(units: List[Unit], world_size: int) -> Tuple[Dict[TaskKey, int], List[float]]:
    units = sorted(units, key=lambda u: (-u[0], u[1]))
    heap = [(0.0, r) for r in range(world_size)]
    loads = [0.0] * world_size
    owner: Dict[TaskKey, int] = {}
    for unit_cost, _, keys in units:
        load, rank = heapq.heappop(heap)
        for key in keys:
            owner[key] = rank
        loads[rank] = load + unit_cost
        heapq.heappush(heap, (loads[rank], rank))
    return owner, loads
