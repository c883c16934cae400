"""Layer-to-rank assignment: which rank inverts which factor and preconditions which layer.

Cost model per work item of side n: COMPUTE ~ n^3 (eigendecomposition / inverse), MEMORY ~ n^2;
diagonal factors and unit-wise blocks ~ n. COMMUNICATION balances whole layers by the size of
their gradients, which is what SP-NGD's padded reduce-scatter and all-gather move every step.
A greedy longest-processing-time (LPT) schedule gives each item, largest first, to the
least-loaded rank (NGD_NOTES section 6, as kfac-pytorch). A and G of one layer may go to different
ranks (``split_factors``). Ties are broken by names and rank numbers, so every rank computes
the same plan from the same layers, whatever their input order.

KAISA gradient-worker groups: ranks are cut into contiguous worker groups of ``grad_workers``
ranks and strided receiver groups; each receiver group meets each worker group in one rank.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Dict, List, Sequence, Tuple

from hvd_ngd.enums import AssignmentCost
from hvd_ngd.layer_spec import LayerSpec


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One statistic to invert: "A", "G", or "F" (the unit-wise blocks of a BN/LN layer)."""

    layer: str
    statistic: str
    size: int
    diagonal: bool = False


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
    cost = AssignmentCost(cost)
    n = float(item.size)
    if item.diagonal:
        return n
    return n**3 if cost is AssignmentCost.COMPUTE else n**2


def layer_gradient_elements(spec: LayerSpec) -> int:
    """Elements of a layer's gradient matrix (what SP-NGD reduce-scatters and all-gathers)."""
    return 2 * spec.out_features if spec.kind.is_unitwise else spec.g_dim * spec.a_dim


def communication_elements(n: int, packed: bool) -> int:
    """Elements sent for an n x n symmetric factor: n^2, or n(n+1)/2 packed."""
    return n * (n + 1) // 2 if packed else n * n


@dataclasses.dataclass
class AssignmentPlan:
    """Result of ``assign``.

    Attributes:
        inverse_worker: (layer, statistic) -> rank computing that inverse.
        layer_owner: layer -> rank preconditioning the layer's gradient: the worker of its G
            factor (or F), since G is the factor applied first.
        loads: summed cost per rank.
    """

    inverse_worker: Dict[Tuple[str, str], int]
    layer_owner: Dict[str, int]
    loads: List[float]

    @property
    def max_mean_load(self) -> float:
        """max(load) / mean(load); 1.0 is perfect balance."""
        mean = sum(self.loads) / len(self.loads) if self.loads else 0.0
        return max(self.loads) / mean if mean > 0 else 1.0

    def owner(self, layer: str, statistic: str) -> int:
        """Rank computing the inverse of one statistic."""
        return self.inverse_worker[(layer, statistic)]

    def layers_of(self, rank: int) -> List[str]:
        """Layers whose gradient ``rank`` preconditions, sorted."""
        return sorted(n for n, r in self.layer_owner.items() if r == rank)


def assign(
    specs: Sequence[LayerSpec],
    world_size: int,
    cost: AssignmentCost = AssignmentCost.COMPUTE,
    split_factors: bool = True,
) -> AssignmentPlan:
    """Greedy LPT assignment of inverse work to ``world_size`` ranks.

    Args:
        specs: the preconditioned layers (any order; the plan does not depend on it).
        world_size: number of ranks.
        cost: cost model (an ``AssignmentCost`` or its string value).
        split_factors: place A and G of a layer independently (True) or together, with their
            summed cost (False).

    Returns:
        The plan; an empty ``specs`` gives an empty plan with zero loads.

    Raises:
        ValueError: world_size < 1, duplicate layer names, or COMMUNICATION with split factors.
    """
    cost = AssignmentCost(cost)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"invalid world_size={world_size!r}: must be an int >= 1")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names: {sorted({n for n in names if names.count(n) > 1})}")
    items = work_items(specs)
    units: List[Tuple[float, str, Tuple[WorkItem, ...]]] = []
    if cost is AssignmentCost.COMMUNICATION:
        if split_factors:
            raise ValueError("assignment_cost='communication' balances whole layers: it needs split_factors=False")
        by_name: Dict[str, List[WorkItem]] = {}
        for i in items:
            by_name.setdefault(i.layer, []).append(i)
        units = [(float(layer_gradient_elements(s)), s.name, tuple(by_name[s.name])) for s in specs]
    elif split_factors:
        units = [(item_cost(i, cost), f"{i.layer}/{i.statistic}", (i,)) for i in items]
    else:
        by_layer: Dict[str, List[WorkItem]] = {}
        for i in items:
            by_layer.setdefault(i.layer, []).append(i)
        units = [(sum(item_cost(i, cost) for i in group), layer, tuple(group)) for layer, group in by_layer.items()]
    units.sort(key=lambda u: (-u[0], u[1]))
    heap = [(0.0, r) for r in range(world_size)]
    loads = [0.0] * world_size
    worker: Dict[Tuple[str, str], int] = {}
    for unit_cost, _, group in units:
        load, rank = heapq.heappop(heap)
        for i in group:
            worker[(i.layer, i.statistic)] = rank
        loads[rank] = load + unit_cost
        heapq.heappush(heap, (loads[rank], rank))
    owner = {
        s.name: worker[(s.name, "F")] if s.kind.is_unitwise else worker[(s.name, "G")] for s in specs
    }
    return AssignmentPlan(worker, owner, loads)


def _check_groups(world_size: int, grad_workers: int) -> None:
    for name, value in (("world_size", world_size), ("grad_workers", grad_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid grad_worker_fraction: {name}={value!r} must be an int >= 1")
    if grad_workers < 1 or grad_workers > world_size or world_size % grad_workers != 0:
        raise ValueError(
            f"invalid grad_worker_fraction: {grad_workers} gradient workers do not divide the world size "
            f"{world_size}; grad_worker_fraction * world_size must be a divisor of the world size"
        )


def grad_worker_groups(world_size: int, grad_workers: int) -> List[List[int]]:
    """Contiguous groups of ``grad_workers`` ranks ([[0, 1], [2, 3]] for 4 ranks, 2 workers).

    ``grad_workers = world_size`` is COMM-OPT (one group), 1 is MEM-OPT.

    Raises:
        ValueError: ``grad_workers`` does not divide ``world_size`` (names grad_worker_fraction).
    """
    _check_groups(world_size, grad_workers)
    return [list(range(start, start + grad_workers)) for start in range(0, world_size, grad_workers)]


def grad_receiver_groups(world_size: int, grad_workers: int) -> List[List[int]]:
    """Strided groups {i, i + grad_workers, ...} ([[0, 2], [1, 3]] for 4 ranks, 2 workers).

    Each receiver group meets each worker group in exactly one rank.

    Raises:
        ValueError: ``grad_workers`` does not divide ``world_size`` (names grad_worker_fraction).
    """
    _check_groups(world_size, grad_workers)
    return [list(range(i, world_size, grad_workers)) for i in range(grad_workers)]
