"""Unit-wise natural gradient of BatchNorm / LayerNorm (SP-NGD): a damped 2x2 Fisher per unit."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from hvd_ngd import damping as damping_rules
from hvd_ngd import unitwise
from hvd_ngd.enums import DampingRule
from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey, Statistic
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps


class UnitwiseBlock(CurvatureBlock):
    """One statistic ``F`` of shape (C, 3): the (gamma, gamma), (gamma, beta), (beta, beta)
    entries of each unit's 2x2 Fisher; inverted in closed form at preconditioning time.

    Gradient matrix: (2, C) = [grad_gamma; grad_beta].
    """

    def __init__(self, spec: LayerSpec, rule: DampingRule = DampingRule.ABSOLUTE) -> None:
        self.spec = spec
        self.rule = rule
        self.f_key = StatKey(spec.name, Statistic.F)
        self.statistics = (self.f_key,)

    def is_symmetric_matrix(self, key: StatKey) -> bool:
        return False

    def shape(self, key: StatKey) -> Tuple[int, ...]:
        return (self.spec.out_features, 3)

    @property
    def inverted(self) -> Tuple[StatKey, ...]:
        return ()

    def has_curvature(self, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse]) -> bool:
        return self.f_key in factors

    def precondition(
        self,
        ops: ArrayOps,
        grad: Array,
        factors: Mapping[StatKey, Array],
        inverses: Dict[StatKey, FactorInverse],
        damping: float,
    ) -> Array:
        return self.apply(ops, grad, self.operands(ops, factors, inverses, damping))

    # ------------------------------------------------------------------ frozen curvature
    def operand_shapes(self) -> Optional[List[Tuple[int, ...]]]:
        """(F, lambda): the (C, 3) Fisher blocks and the damping actually added."""
        return [(self.spec.out_features, 3), ()]

    def operands(
        self, ops: ArrayOps, factors: Mapping[StatKey, Array], inverses: Mapping[StatKey, FactorInverse], damping: float
    ) -> Tuple["Array | float", ...]:
        fisher = factors[self.f_key]
        return (fisher, damping_rules.unitwise_damping(ops, fisher, damping, self.rule))

    def apply(self, ops: ArrayOps, grad: Array, operands: Sequence["Array | float"]) -> Array:
        """The closed-form 2x2 solves of every unit."""
        fisher, lam = operands
        pg, pb = unitwise.unitwise_precondition(ops, fisher, grad[0], grad[1], lam)
        return ops.stack([pg, pb], 0)
