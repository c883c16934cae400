"""Greedy longest-processing-time (LPT) assignment of statistic blocks to ranks.

Each unit of work, largest first, goes to the least-loaded rank (NGD_NOTES section 6, as
kfac-pytorch). A and G of one layer may go to different ranks (``split_factors``). Ties are
broken by names and rank numbers, so every rank computes the same plan from the same layers,
whatever their input order.

Costs: without a ``CostModel``, ``items.item_cost`` (n^3 or n^2); with one, measured seconds of
each block's inverse, and each layer's preconditioning bundled with its G (block 0) or F,
whose owner preconditions the layer. With factor splitting (``split``), every block is its own
unit; unsplit (``split_factors=False``), block 0 of A and of G stay together with the layer.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd.assignment.items import WorkItem, layer_gradient_elements, side_cost, work_items
from hvd_ngd.assignment.plan import AssignmentPlan, BlockTask, TaskKey
from hvd_ngd.assignment.splitting import SplitPolicy
from hvd_ngd.blocks.layout import BlockLayout, block_layout
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import AssignmentCost
from hvd_ngd.layer_spec import LayerSpec

Unit = Tuple[float, str, Tuple[TaskKey, ...]]


class _Costs:
    """Block and preconditioning costs under one cost model, cached by shape."""

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


def _units(
    items: Sequence[WorkItem],
    layouts: Mapping[Tuple[str, str], BlockLayout],
    costs: _Costs,
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


def _lpt(units: List[Unit], world_size: int) -> Tuple[Dict[TaskKey, int], List[float]]:
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


def _choose_layouts(
    items: Sequence[WorkItem], world_size: int, costs: _Costs, split_factors: bool, policy: SplitPolicy
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
            units, _ = _units(items, layouts, costs, split_factors, named=False)
            fair = sum(u[0] for u in units) / world_size
            estimate = max(max((u[0] for u in units), default=0.0), fair)
            scored.append((estimate, tau, layouts, units))
            if open_max <= share * fair:
                break  # balanced enough: smaller blocks would only shed work (and accuracy)
        best_estimate = min(s[0] for s in scored)
        shortlist = sorted((s for s in scored if s[0] <= 1.5 * best_estimate), key=lambda s: s[0])[:24]
        evaluated = []
        for _, tau, layouts, units in shortlist:
            makespan = max(_lpt(units, world_size)[1])
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


def assign(
    specs: Sequence[LayerSpec],
    world_size: int,
    cost: AssignmentCost = AssignmentCost.COMPUTE,
    split_factors: bool = True,
    cost_model: Optional[CostModel] = None,
    split: Optional[SplitPolicy] = None,
    blocks: Optional[Mapping[Tuple[str, str], int]] = None,
) -> AssignmentPlan:
    """Greedy LPT assignment of inverse (and, with a cost model, preconditioning) work.

    Args:
        specs: the preconditioned layers (any order; the plan does not depend on it).
        world_size: number of ranks.
        cost: cost model without measurements (an ``AssignmentCost`` or its string value).
        split_factors: place A and G of a layer independently (True) or together, with their
            summed cost (False).
        cost_model: measured seconds per piece of work (``hvd_ngd.costs``); replaces the n^3
            guess of COMPUTE and adds each layer's preconditioning to its owner's load.
        split: factor splitting on: the planner chooses blocks per factor (``SplitPolicy``).
        blocks: fixed numbers of blocks, (layer, statistic) -> k, instead of ``split``'s choice
            (statistics not named keep one block).

    Returns:
        The plan; an empty ``specs`` gives an empty plan with zero loads.

    Raises:
        ValueError: world_size < 1, duplicate layer names, COMMUNICATION with split factors,
            factor splitting, or a cost model; a cost model with MEMORY; both ``split`` and
            ``blocks``; ``blocks`` naming an unknown or unsplittable statistic or an invalid k.
    """
    cost = AssignmentCost(cost)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"invalid world_size={world_size!r}: must be an int >= 1")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names: {sorted({n for n in names if names.count(n) > 1})}")
    if split is not None and blocks is not None:
        raise ValueError("pass either split (the planner chooses blocks) or blocks (fixed), not both")
    if cost_model is not None and cost is not AssignmentCost.COMPUTE:
        raise ValueError(f"a measured cost_model replaces assignment_cost='compute'; got {cost.value!r}")
    items = work_items(specs)
    if cost is AssignmentCost.COMMUNICATION:
        if split_factors:
            raise ValueError("assignment_cost='communication' balances whole layers: it needs split_factors=False")
        if split is not None or blocks:
            raise ValueError("assignment_cost='communication' balances whole layers: factor splitting needs 'compute'")
        return _assign_layers_by_bytes(specs, items, world_size)
    costs = _Costs(specs, cost, cost_model)
    layouts = {(i.layer, i.statistic): block_layout(i.size, 1) for i in items}
    if blocks:
        by_key = {(i.layer, i.statistic): i for i in items}
        for key, k in blocks.items():
            if key not in by_key or not by_key[key].splittable:
                raise ValueError(f"blocks names {key!r}: not a dense A or G factor of these layers")
            layouts[key] = block_layout(by_key[key].size, k)
    elif split is not None and world_size > 1:
        layouts = _choose_layouts(items, world_size, costs, split_factors, split)
    units, pre = _units(items, layouts, costs, split_factors, named=True)
    owner, loads = _lpt(units, world_size)
    item_of = {(i.layer, i.statistic): i for i in items}
    ordered = sorted(units, key=lambda u: (-u[0], u[1]))
    tasks = []
    for _, _, keys in ordered:
        for key in keys:
            lay = layouts[(key.layer, key.statistic)]
            item = item_of[(key.layer, key.statistic)]
            size = lay.sizes[key.block]
            tasks.append(BlockTask(key, lay.offsets[key.block], size, item.diagonal,
                                   costs.block(size, item.diagonal, key.statistic), owner[key]))
    worker = {(i.layer, i.statistic): owner[TaskKey(i.layer, i.statistic, 0)] for i in items}
    layer_owner = {s.name: worker[(s.name, "F")] if s.kind.is_unitwise else worker[(s.name, "G")] for s in specs}
    largest = max((u[0] for u in units), default=0.0)
    return AssignmentPlan(worker, layer_owner, loads, layouts, tasks, pre, largest)


def _assign_layers_by_bytes(specs: Sequence[LayerSpec], items: Sequence[WorkItem], world_size: int) -> AssignmentPlan:
    """COMMUNICATION: whole layers balanced by the elements of their gradients."""
    by_name: Dict[str, List[WorkItem]] = {}
    for i in items:
        by_name.setdefault(i.layer, []).append(i)
    units: List[Unit] = [
        (float(layer_gradient_elements(s)), s.name, tuple(TaskKey(i.layer, i.statistic, 0) for i in by_name[s.name]))
        for s in specs
    ]
    owner, loads = _lpt(units, world_size)
    layouts = {(i.layer, i.statistic): block_layout(i.size, 1) for i in items}
    tasks = [BlockTask(TaskKey(i.layer, i.statistic, 0), 0, i.size, i.diagonal, 0.0, owner[TaskKey(i.layer, i.statistic, 0)])
             for i in items]
    worker = {(i.layer, i.statistic): owner[TaskKey(i.layer, i.statistic, 0)] for i in items}
    layer_owner = {s.name: worker[(s.name, "F")] if s.kind.is_unitwise else worker[(s.name, "G")] for s in specs}
    return AssignmentPlan(worker, layer_owner, loads, layouts, tasks, {}, max((u[0] for u in units), default=0.0))
