"""What the engine learns while training: running factors, inverses, damping, step count.

``EngineState`` is plain data owned by the engine; ``local_state`` / ``merge_states`` turn the
per-rank pieces into one checkpoint that loads on any world size (SP-NGD owners and KAISA
worker groups each hold part of the factors and inverses).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Set, Tuple

from hvd_ngd import inverse
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array, ArrayOps


@dataclasses.dataclass
class EngineState:
    """Per-rank running state.

    Attributes:
        steps: preconditioned steps taken.
        factors: running statistics this rank holds.
        inverses: decompositions / inverses this rank holds.
        layer_damping: per-layer damping (the base damping, escalated after failures).
        force_inverse: statistics whose inverse is recomputed at the next step (after a failure).
        fallbacks: (step, layer, reason) of every plain-gradient fallback, for inspection.
    """

    steps: int = 0
    factors: Dict[StatKey, Array] = dataclasses.field(default_factory=dict)
    inverses: Dict[StatKey, FactorInverse] = dataclasses.field(default_factory=dict)
    layer_damping: Dict[str, float] = dataclasses.field(default_factory=dict)
    force_inverse: Set[StatKey] = dataclasses.field(default_factory=set)
    fallbacks: List[Tuple[int, str, str]] = dataclasses.field(default_factory=list)

    def local_state(self, ops: ArrayOps) -> Dict[str, Any]:
        """This rank's part of a checkpoint (numpy arrays, string keys)."""
        return {
            "factors": {str(k): ops.to_numpy(v) for k, v in self.factors.items()},
            "inverses": {str(k): [ops.to_numpy(t) for t in inverse.inverse_to_tensors(v)] for k, v in self.inverses.items()},
            "layer_damping": dict(self.layer_damping),
            "force_inverse": sorted(str(k) for k in self.force_inverse),
        }


def merge_states(parts: List[Mapping[str, Any]], layers: List[str]) -> Dict[str, Any]:
    """One checkpoint from every rank's ``local_state`` (rank order).

    The lowest rank holding a value wins; escalated damping and forced inverses live where a
    layer was preconditioned, so the largest damping and the union of forced inverses are kept.
    """
    factors: Dict[str, Any] = {}
    inverses: Dict[str, Any] = {}
    for part in reversed(parts):
        factors.update(part["factors"])
        inverses.update(part["inverses"])
    return {
        "factors": factors,
        "inverses": inverses,
        "layer_damping": {n: max(p["layer_damping"][n] for p in parts) for n in layers},
        "force_inverse": sorted(set().union(*(p["force_inverse"] for p in parts))),
    }
