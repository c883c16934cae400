"""Per-rank curvature math over the engine state: fold statistics, refresh inverses,
precondition, and the step's health checks.

Host reads are batched: one read decides which freshly reduced statistics are finite (at steps
where any is due), and the strategies read one vector at the end of a step holding every
layer's sum(v . g) (KL clipping; a non-finite value also flags a non-finite preconditioned
gradient) and, under the adaptive policy, the relative changes of the refreshed statistics.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from hvd_ngd import kl_clip as kl_clip_rules
from hvd_ngd import running_average
from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.blocks.kronecker import KroneckerBlock
from hvd_ngd.config import KFACConfig
from hvd_ngd.engine.batched import BatchedKronecker, shape_groups
from hvd_ngd.engine.schedule import Schedule
from hvd_ngd.engine.state import EngineState
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import FactorInverse
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array, ArrayOps


class CurvatureWarning(RuntimeWarning):
    """A layer fell back to its plain gradient because its curvature was not usable."""


Change = Optional[Array]  # 0-d tensor of a relative change, None: no previous value (infinite)


class Curvature:
    """Factor math of one rank.

    Args:
        ops: array backend.
        config: validated configuration.
        blocks: layer name -> block, in layer order.
        state: the engine state this object updates.
        schedule: scheduled hyperparameters and the stale-statistics tracker.
    """

    def __init__(
        self, ops: ArrayOps, config: KFACConfig, blocks: Mapping[str, CurvatureBlock], state: EngineState, schedule: Schedule
    ) -> None:
        self.ops = ops
        self.config = config
        self.blocks = blocks
        self.state = state
        self.schedule = schedule
        self.batched = BatchedKronecker()
        self._shape_groups: Dict[Tuple[str, ...], List[List[KroneckerBlock]]] = {}
        self.fallen: Set[str] = set()  # layers on their plain gradient at this step
        self.forced_now: Set[StatKey] = set()  # inverses recomputed now after a failure

    # ------------------------------------------------------------------ statistics
    def fold(self, keys: Sequence[StatKey], values: Sequence[Array]) -> Dict[StatKey, Change]:
        """Fold reduced batch statistics into the running factors (one host read).

        Non-finite values are not folded; their layer falls back at this step.

        Returns:
            The folded keys with their relative change tensor (ADAPTIVE policy) or None.
        """
        if not keys:
            return {}
        ops = self.ops
        sums = ops.to_numpy(ops.stack([ops.sum(v) for v in values], 0))
        decay = self.schedule.values.factor_decay
        adaptive = self.schedule.adaptive
        out: Dict[StatKey, Change] = {}
        for key, value, total in zip(keys, values, sums):
            if not math.isfinite(float(total)):
                self.fall_back(key.layer, f"non-finite statistic {key}")
                continue
            previous = self.state.factors.get(key)
            updated = running_average.ema(ops, previous, value, decay)
            self.state.factors[key] = updated
            out[key] = self.relative_change(updated, previous) if adaptive and previous is not None else None
        return out

    def relative_change(self, new: Array, previous: Array) -> Array:
        """See ``relative_change``."""
        return relative_change(self.ops, new, previous)

    def record_changes(self, step: int, keys: Sequence[StatKey], values: Sequence[float]) -> None:
        """Give the tracker the changes of refreshed statistics (negative: not folded)."""
        for key, change in zip(keys, values):
            if change >= 0.0:
                self.schedule.tracker.record_refresh(key, step, change)

    # ------------------------------------------------------------------ inverses
    def inverse_due(self, key: StatKey) -> bool:
        """Whether an inverse is recomputed now: by schedule, or after a failure at the last step."""
        due = self.schedule.inverse_due(self.state.steps, key)
        return due or key in self.forced_now

    def compute_inverse(self, key: StatKey) -> FactorInverse:
        """Invert one running factor; on failure warn and return a NaN inverse of the right
        shape (a NaN inverse travels like a good one, so every rank that uses it falls back)."""
        block = self.blocks[key.layer]
        try:
            return block.invert(self.ops, key, self.state.factors, self.state.layer_damping[key.layer])
        except Exception as exc:  # noqa: BLE001 - any backend's linear-algebra failure
            warnings.warn(
                f"hvd_ngd: inverting {key} failed at step {self.state.steps} ({exc}); "
                "the layer uses its plain gradient until a decomposition succeeds",
                CurvatureWarning,
                stacklevel=2,
            )
            tensors = [t * float("nan") for t in block.inverse_template(self.ops, key, self.state.factors[key])]
            return block.rebuild_inverse(self.ops, key, tensors)

    # ------------------------------------------------------------------ preconditioning
    def usable(self, layer: str) -> bool:
        """Whether ``layer`` is preconditioned at this step."""
        return layer not in self.fallen and self.blocks[layer].has_curvature(self.state.factors, self.state.inverses)

    def precondition(
        self, layers: Sequence[str], grads: Mapping[str, Array]
    ) -> Tuple[Dict[str, Array], List[str], List[str], List[Array]]:
        """Natural gradients of ``layers`` (batched where shapes repeat).

        Returns:
            layer -> gradient (preconditioned, or plain where the layer has no usable
            curvature); the layers actually preconditioned; and sum(v * g) of every layer in
            ``layers`` as (names, vector pieces) in matching order.
        """
        ops = self.ops
        state = self.state
        out: Dict[str, Array] = {}
        computed: List[str] = []
        kron: List[KroneckerBlock] = []
        singles: List[str] = []
        for name in layers:
            if not self.usable(name):
                out[name] = grads[name]
                singles.append(name)
                continue
            computed.append(name)
            block = self.blocks[name]
            if isinstance(block, KroneckerBlock) and block.method is InverseMethod.EIGEN and not block.a_diagonal:
                kron.append(block)
            else:
                out[name] = block.precondition(ops, grads[name], state.factors, state.inverses, state.layer_damping[name])
                singles.append(name)
        names: List[str] = []
        pieces: List[Array] = []
        group_key = tuple(b.name for b in kron)
        groups = self._shape_groups.get(group_key)
        if groups is None:  # once per set of preconditioned layers
            groups = self._shape_groups[group_key] = shape_groups(kron)
        for group in groups:
            if len(group) == 1:
                b = group[0]
                out[b.name] = b.precondition(ops, grads[b.name], state.factors, state.inverses, state.layer_damping[b.name])
                singles.append(b.name)
                continue
            pgs, vg = self.batched.precondition(ops, group, [grads[b.name] for b in group], state.inverses, state.layer_damping)
            for b, pg in zip(group, pgs):
                out[b.name] = pg
            names.extend(b.name for b in group)
            pieces.append(vg)
        if singles:
            names.extend(singles)
            pieces.append(self.vg_terms(singles, out, grads))
        return out, computed, names, pieces

    def vg_terms(self, layers: Sequence[str], pgrads: Mapping[str, Array], grads: Mapping[str, Array]) -> Array:
        """sum(v * g) per layer, as one vector (its finiteness flags non-finite gradients)."""
        ops = self.ops
        return ops.stack([ops.sum(pgrads[n] * grads[n]) for n in layers], 0)

    def kl_scale(self, vg_total: float) -> float:
        """KL-clipping scale from sum(v . g) over all layers."""
        v = self.schedule.values
        if v.kl_clip is None:
            return 1.0
        return kl_clip_rules.kl_clip_scale_from_sum(vg_total, v.lr, v.kl_clip)

    # ------------------------------------------------------------------ failures
    def fall_back(self, layer: str, reason: str) -> None:
        """Record and warn that ``layer`` uses its plain gradient at this step."""
        self.state.fallbacks.append((self.state.steps, layer, reason))
        self.fallen.add(layer)
        warnings.warn(
            f"hvd_ngd: layer {layer!r} uses its plain gradient at step {self.state.steps}: {reason}",
            CurvatureWarning,
            stacklevel=3,
        )

    def escalate(self, layer: str) -> None:
        """A layer's preconditioned gradient was not finite: fall back, raise its damping x10
        (capped by ``max_damping``) and recompute its inverses at the next step."""
        old = self.state.layer_damping[layer]
        self.state.layer_damping[layer] = min(self.config.max_damping, old * 10.0)
        self.fall_back(
            layer,
            "non-finite preconditioned gradient (singular or non-finite curvature); damping "
            f"{old:g} -> {self.state.layer_damping[layer]:g}, inverses recomputed next step",
        )
        self.state.force_inverse.update(self.blocks[layer].inverted)

    def checked(self, layers: Sequence[str], pgrads: Dict[str, Array], grads: Mapping[str, Array]) -> None:
        """Replace non-finite preconditioned gradients of ``layers`` by their plain gradient,
        escalating damping (one host read)."""
        if not layers:
            return
        values = self.ops.to_numpy(self.vg_terms(layers, pgrads, grads))
        for name, value in zip(layers, values):
            if not math.isfinite(float(value)):
                self.escalate(name)
                pgrads[name] = grads[name]

    def end_step(self) -> None:
        """Forget the step's fallbacks."""
        self.fallen.clear()


def relative_change(ops: ArrayOps, new: Array, previous: Array) -> Array:
    """||new - previous||_F / ||previous||_F of a refreshed statistic as a 0-d tensor (no host
    read; the adaptive policy reads it with the step's other scalars). A zero ``previous`` gives
    0 when ``new`` is zero too, else a huge value (>= 1e30: always above the threshold)."""
    tiny = 1e-300 if ops.dtype_name(previous) == "float64" else 1e-30
    return ops.frobenius_norm(new - previous) / ops.maximum(ops.frobenius_norm(previous), tiny)


def finite(values: np.ndarray) -> np.ndarray:
    """Elementwise finiteness of a host vector."""
    return np.isfinite(values)
