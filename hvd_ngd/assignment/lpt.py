"""``assign``: greedy longest-processing-time (LPT) assignment of statistic blocks to ranks.

Each unit of work (``units``), largest first, goes to the least-loaded rank (NGD_NOTES
section 6, as kfac-pytorch). A and G of one layer may go to different ranks (``split_factors``). Ties are
broken by names and rank numbers, so every rank computes the same plan from the same layers,
whatever their input order.

Costs: without a ``CostModel``, ``items.item_cost`` (n^3 or n^2); with one, measured seconds of
each block's inverse, and each layer's preconditioning bundled with its G (block 0) or F,
whose owner preconditions the layer. With factor splitting (``split``), every block is its own
unit; unsplit (``split_factors=False``), block 0 of A and of G stay together with the layer.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd.assignment.items import WorkItem, layer_gradient_elements, work_items
from hvd_ngd.assignment.plan import AssignmentPlan, BlockTask, TaskKey
from hvd_ngd.assignment.splitting import SplitPolicy, choose_layouts
from hvd_ngd.assignment.units import Costs, Unit, build_units, lpt
from hvd_ngd.blocks.layout import block_layout
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import AssignmentCost
from hvd_ngd.layer_spec import LayerSpec


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
    costs = Costs(specs, cost, cost_model)
    layouts = {(i.layer, i.statistic): block_layout(i.size, 1) for i in items}
    if blocks:
        by_key = {(i.layer, i.statistic): i for i in items}
        for key, k in blocks.items():
            if key not in by_key or not by_key[key].splittable:
                raise ValueError(f"blocks names {key!r}: not a dense A or G factor of these layers")
            layouts[key] = block_layout(by_key[key].size, k)
    elif split is not None and world_size > 1:
        layouts = choose_layouts(items, world_size, costs, split_factors, split)
    units, pre = build_units(items, layouts, costs, split_factors, named=True)
    owner, loads = lpt(units, world_size)
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
    owner, loads = lpt(units, world_size)
    layouts = {(i.layer, i.statistic): block_layout(i.size, 1) for i in items}
    tasks = [BlockTask(TaskKey(i.layer, i.statistic, 0), 0, i.size, i.diagonal, 0.0, owner[TaskKey(i.layer, i.statistic, 0)])
             for i in items]
    worker = {(i.layer, i.statistic): owner[TaskKey(i.layer, i.statistic, 0)] for i in items}
    layer_owner = {s.name: worker[(s.name, "F")] if s.kind.is_unitwise else worker[(s.name, "G")] for s in specs}
    return AssignmentPlan(worker, layer_owner, loads, layouts, tasks, {}, max((u[0] for u in units), default=0.0))
