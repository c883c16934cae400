"""Where each layer's curvature work runs: owners, inverse workers, gradient-worker groups.

Computed once per world (size and rank) from the assignment policy (``hvd_ngd.assignment``) and
kept: the per-step code only looks things up.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from hvd_ngd import assignment
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import AssignmentCost, Strategy
from hvd_ngd.keys import StatKey
from hvd_ngd.layer_spec import LayerSpec


class Placement:
    """The layer-to-rank plan of one world.

    Args:
        specs: registered layers (same order on every rank).
        config: the configuration (strategy, assignment cost, grad_worker_fraction).
        world: number of ranks.
        rank: this rank.

    Attributes:
        plan: the assignment (``plan.owner(layer, statistic)``, ``plan.layer_owner``).
        grad_workers: gradient workers per KAISA group (1 for SP-NGD).
        worker_groups / receiver_groups: KAISA process-set members.
        owned: per rank, the layers it owns (SP-NGD preconditions them), in layer order.
        local_layers: the layers this rank preconditions itself.
    """

    def __init__(self, specs: Sequence[LayerSpec], config: KFACConfig, world: int, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.layer_order = [s.name for s in specs]
        self.grad_workers = 1 if config.strategy is Strategy.SPNGD else config.grad_workers(world)
        split = config.strategy is Strategy.COMM_OPT and config.assignment_cost is not AssignmentCost.COMMUNICATION
        policy = None
        if config.factor_splitting:
            policy = assignment.SplitPolicy(max_blocks=config.max_factor_blocks, min_block_size=config.min_factor_block)
        fixed = None
        if config.factor_blocks:
            names = {s.name for s in specs}
            unknown = sorted(k for k in config.factor_blocks if k.rpartition("/")[0] not in names)
            if unknown:
                raise ValueError(f"invalid factor_blocks: {unknown} name no registered layer")
            fixed = {tuple(k.rsplit("/", 1)): v for k, v in config.factor_blocks.items()}
        self.plan = assignment.assign(
            list(specs), world, config.assignment_cost, split_factors=split, split=policy, blocks=fixed
        )
        self.worker_groups = assignment.grad_worker_groups(world, self.grad_workers)
        self.receiver_groups = assignment.grad_receiver_groups(world, self.grad_workers)
        self.owner: Dict[str, int] = {n: self.plan.layer_owner[n] for n in self.layer_order}
        self.owned: List[List[str]] = [[n for n in self.layer_order if self.owner[n] == r] for r in range(world)]
        self._group_of: Dict[str, List[int]] = {}
        for n in self.layer_order:
            self._group_of[n] = next(g for g in self.worker_groups if self.owner[n] in g)
        self.my_receivers: List[int] = next(g for g in self.receiver_groups if rank in g)
        unitwise = {s.name for s in specs if s.kind.is_unitwise}
        if config.strategy is Strategy.SPNGD:
            self.local_layers = list(self.owned[rank])
        else:
            self.local_layers = [n for n in self.layer_order if n in unitwise or rank in self._group_of[n]]
        self._by_owner: Dict[Tuple[StatKey, ...], List[List[StatKey]]] = {}

    def layer_owner(self, layer: str) -> int:
        """Rank that preconditions ``layer`` (SP-NGD) or leads its worker group (KAISA)."""
        return self.owner[layer]

    def inverse_worker(self, key: StatKey) -> int:
        """Rank that computes the inverse of one statistic (or block). The plan's choice, unless
        it lies outside the layer's gradient-worker group (MEM-OPT / HYBRID with split factors,
        whose blocks the planner spreads over all ranks): then the layer's owner."""
        worker = self.plan.owner(key.layer, key.statistic.value, block=None if key.block < 0 else key.block)
        if self.grad_workers < self.world and worker not in self._group_of[key.layer]:
            return self.owner[key.layer]
        return worker

    def layout(self, layer: str, statistic: str) -> Optional[Any]:
        """Block layout of a split statistic (``BlockLayout``), None when it is whole."""
        layout = getattr(self.plan, "layouts", {}).get((layer, statistic))
        return layout if layout is not None and layout.k > 1 else None

    def worker_group(self, layer: str) -> List[int]:
        """KAISA gradient-worker group of ``layer`` (holds its inverses and preconditions it)."""
        return self._group_of[layer]

    def split_by_owner(self, keys: Tuple[StatKey, ...]) -> List[List[StatKey]]:
        """``keys`` grouped by the owner of their layer (cached per tuple of keys)."""
        out = self._by_owner.get(keys)
        if out is None:
            out = [[] for _ in range(self.world)]
            for k in keys:
                out[self.owner[k.layer]].append(k)
            if len(self._by_owner) > 64:  # adaptive schedules produce many patterns
                self._by_owner.clear()
            self._by_owner[keys] = out
        return out

    def group_arg(self, layer: str) -> Optional[List[int]]:
        """The process-set members for a worker-group broadcast, or None for the whole world."""
        return self._group_of[layer] if self.grad_workers < self.world else None
