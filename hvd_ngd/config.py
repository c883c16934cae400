"""Validated configuration shared by every adapter."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar, Union

from hvd_ngd.enums import (
    AssignmentCost,
    DampingRule,
    FisherType,
    IntervalPolicy,
    InverseMethod,
    LossFamily,
    LossReduction,
    Strategy,
    WireDtype,
)

Interval = Union[int, Callable[[int], int]]
E = TypeVar("E")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"invalid {name}={value!r}: must be {allowed}")


def _coerce_enum(name: str, value: Any, enum_type: Type[E]) -> E:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)  # type: ignore[call-arg]
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_type)  # type: ignore[attr-defined]
        raise _bad(name, value, f"one of {allowed}") from None


def _check_interval(name: str, value: Interval) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(name, value, "an int >= 1 or a callable step -> int >= 1")


def resolve_interval(name: str, value: Interval, step: int) -> int:
    """Evaluate an interval (int or callable of the step) and validate the result."""
    result = value(step) if callable(value) else value
    if isinstance(result, bool) or not isinstance(result, int) or result < 1:
        raise _bad(f"{name}({step})", result, "an int >= 1")
    return result


def _check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        raise _bad(name, value, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


@dataclasses.dataclass
class KFACConfig:
    """Configuration of the natural-gradient preconditioner (identical names in every adapter).

    Attributes:
        lr: learning rate used by KL clipping (kept in sync with the optimizer by adapters).
        damping: Tikhonov damping (> 0): under ``damping_rule`` RELATIVE a fraction of each
            layer's mean curvature eigenvalue, under ABSOLUTE the lambda added to A (x) G itself.
        damping_rule: RELATIVE (scale-invariant, lambda = damping * mean eigenvalue of the
            layer's block) or ABSOLUTE (lambda = damping); see ``hvd_ngd.damping``.
        factor_decay: running-average decay xi of the factors in [0, 1); 0 = current batch only.
        kl_clip: KL-clipping constant kappa (> 0), or None to disable.
        factor_update_interval: steps between factor refreshes (int or callable of the step).
        inv_update_interval: steps between inverse refreshes (int or callable of the step).
        interval_policy: FIXED intervals, or the SP-NGD ADAPTIVE rule per statistic.
        adaptive_threshold: relative Frobenius change below which a statistic's interval grows.
        adaptive_min_interval: smallest interval of the adaptive rule (>= 1).
        adaptive_max_interval: largest interval of the adaptive rule (>= min).
        adaptive_growth: factor by which an interval grows/shrinks (> 1; 2 = doubling).
        inverse_method: EIGEN (exact damping, decompose once) or CHOLESKY (pi-corrected).
        pi_correction: split damping between A and G with pi (CHOLESKY only).
        fisher_type: EMPIRICAL (G from the gradients of the training loss with the true labels,
            as the papers do) or MONTE_CARLO (``'mc'``, the 1-sample "true" Fisher: G and the
            unit-wise F from an extra backward pass of the loss with labels sampled from the
            model's predictive distribution, run only at steps where one of them is due; the
            applied gradient stays the true-label gradient). MONTE_CARLO needs ``loss_family``.
        loss_family: the training loss as a likelihood (``LossFamily``: ``'cross_entropy'`` or
            ``'mse'``); required by, and only allowed with, ``fisher_type='mc'``.
        loss_reduction: whether the user's loss is a MEAN or SUM over the batch.
        strategy: distribution strategy (see ``Strategy``).
        grad_worker_fraction: KAISA fraction of ranks that receive each inverse in (0, 1];
            1 = COMM_OPT, 1/world = MEM_OPT. Ignored by SPNGD.
        assignment_cost: cost model of the layer-to-rank plan.
        symmetric_packing: send only the upper triangle of symmetric factors.
        wire_dtype: element type of factors and inverses on the wire.
        stale_inverse: distribute inverses asynchronously; ranks use the previous inverse
            until the new one arrives (staleness bounded by one refresh).
        skip_layers: regular expressions; a layer whose name or class name matches is skipped.
        fusion_threshold_bytes: size of fused communication buffers (>= 0; 0 disables fusion).
        max_damping: upper bound for damping escalation after repeated decomposition failures.
        consistency_check_interval: every this many steps, ranks compare their hyperparameters
            (step count, lr, damping, decay, KL clip, intervals, and the optimizer's values the
            adapter adds) with one small allgather and raise on a difference (>= 0; 0 disables;
            a world of one rank never checks).
        skip_nonfinite_steps: when any rank's gradients are not finite (a NaN in one rank's
            batch), every rank skips the step's update and folds none of its factors, warns
            with the ranks and the step, and counts it (``Preconditioner.skipped_steps``), as
            ``GradScaler`` does. The flag travels in the consistency allgather (no extra
            collective at checked steps; otherwise one 1-element allreduce).
        factor_splitting: let the planner cut factors larger than a fair share of the work into
            diagonal blocks (a block-diagonal approximation), each block its own statistic with
            its own inverse worker and schedule; k is chosen per factor from the world size
            (EIGEN only). Useful when ranks outnumber layers; it costs accuracy (README "Scale").
        min_factor_block / max_factor_blocks: smallest block side and most blocks per factor.
        factor_blocks: fixed block counts per statistic, e.g. ``{"fc1/A": 2}`` (exclusive with
            ``factor_splitting``).
    """

    lr: float = 0.1
    damping: float = 0.1
    damping_rule: DampingRule = DampingRule.ABSOLUTE
    factor_decay: float = 0.95
    kl_clip: Optional[float] = 1e-2
    factor_update_interval: Interval = 10
    inv_update_interval: Interval = 50
    interval_policy: IntervalPolicy = IntervalPolicy.FIXED
    adaptive_threshold: float = 0.05
    adaptive_min_interval: int = 1
    adaptive_max_interval: int = 64
    adaptive_growth: float = 2.0
    inverse_method: InverseMethod = InverseMethod.EIGEN
    pi_correction: bool = True
    fisher_type: FisherType = FisherType.EMPIRICAL
    loss_family: Optional[LossFamily] = None
    loss_reduction: LossReduction = LossReduction.MEAN
    strategy: Strategy = Strategy.COMM_OPT
    grad_worker_fraction: float = 1.0
    assignment_cost: AssignmentCost = AssignmentCost.COMPUTE
    symmetric_packing: bool = True
    wire_dtype: WireDtype = WireDtype.FLOAT32
    stale_inverse: bool = False
    skip_layers: Tuple[str, ...] = ()
    fusion_threshold_bytes: int = 64 * 1024 * 1024
    max_damping: float = 1.0
    consistency_check_interval: int = 1
    skip_nonfinite_steps: bool = True
    factor_splitting: bool = False
    min_factor_block: int = 512
    max_factor_blocks: int = 64
    factor_blocks: Optional[Dict[str, int]] = None

    def __post_init__(self) -> None:
        self.interval_policy = _coerce_enum("interval_policy", self.interval_policy, IntervalPolicy)
        self.damping_rule = _coerce_enum("damping_rule", self.damping_rule, DampingRule)
        self.inverse_method = _coerce_enum("inverse_method", self.inverse_method, InverseMethod)
        self.fisher_type = _coerce_enum("fisher_type", self.fisher_type, FisherType)
        if self.loss_family is not None:
            self.loss_family = _coerce_enum("loss_family", self.loss_family, LossFamily)
        if self.fisher_type is FisherType.MONTE_CARLO and self.loss_family is None:
            raise _bad(
                "loss_family", None,
                "one of 'cross_entropy', 'mse' with fisher_type='mc': the Monte-Carlo Fisher samples labels "
                "from the distribution whose negative log-likelihood is the loss, e.g. "
                "KFAC(model, fisher_type='mc', loss_family='cross_entropy')",
            )
        if self.fisher_type is FisherType.EMPIRICAL and self.loss_family is not None:
            raise _bad(
                "loss_family", self.loss_family.value,
                "None with fisher_type='empirical' (the empirical Fisher uses the true labels; "
                "set fisher_type='mc' to sample them from the loss family)",
            )
        self.loss_reduction = _coerce_enum("loss_reduction", self.loss_reduction, LossReduction)
        self.strategy = _coerce_enum("strategy", self.strategy, Strategy)
        self.assignment_cost = _coerce_enum("assignment_cost", self.assignment_cost, AssignmentCost)
        self.wire_dtype = _coerce_enum("wire_dtype", self.wire_dtype, WireDtype)
        _check_range("lr", self.lr, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_range("damping", self.damping, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_range("factor_decay", self.factor_decay, 0.0, 1.0, hi_open=True)
        if self.kl_clip is not None:
            _check_range("kl_clip", self.kl_clip, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_interval("factor_update_interval", self.factor_update_interval)
        _check_interval("inv_update_interval", self.inv_update_interval)
        _check_range("adaptive_threshold", self.adaptive_threshold, 0.0, math.inf, lo_open=True, hi_open=True)
        for name in ("adaptive_min_interval", "adaptive_max_interval", "fusion_threshold_bytes", "consistency_check_interval"):
            value = getattr(self, name)
            low = 0 if name in ("fusion_threshold_bytes", "consistency_check_interval") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _bad(name, value, f"an int >= {low}")
        if self.adaptive_max_interval < self.adaptive_min_interval:
            raise _bad(
                "adaptive_max_interval",
                self.adaptive_max_interval,
                f">= adaptive_min_interval={self.adaptive_min_interval}",
            )
        _check_range("adaptive_growth", self.adaptive_growth, 1.0, math.inf, lo_open=True, hi_open=True)
        _check_range("grad_worker_fraction", self.grad_worker_fraction, 0.0, 1.0, lo_open=True)
        _check_range("max_damping", self.max_damping, self.damping, math.inf, hi_open=True)
        for flag in ("pi_correction", "symmetric_packing", "stale_inverse", "skip_nonfinite_steps"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(flag, getattr(self, flag), "a bool")
        for name in ("min_factor_block", "max_factor_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, value, "an int >= 1")
        if not isinstance(self.factor_splitting, bool):
            raise _bad("factor_splitting", self.factor_splitting, "a bool")
        if self.factor_blocks is not None:
            if self.factor_splitting:
                raise _bad("factor_blocks", self.factor_blocks, "None when factor_splitting=True (choose one)")
            if not isinstance(self.factor_blocks, dict) or not all(
                isinstance(k, str) and k.rpartition("/")[2] in ("A", "G") and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                for k, v in self.factor_blocks.items()
            ):
                raise _bad("factor_blocks", self.factor_blocks, "a dict like {'fc1/A': 2} of ints >= 1 per '<layer>/A' or '/G'")
        if (self.factor_splitting or self.factor_blocks) and self.inverse_method is not InverseMethod.EIGEN:
            raise _bad("inverse_method", self.inverse_method.value, "'eigen' with factor splitting")
        if isinstance(self.skip_layers, str):
            self.skip_layers = (self.skip_layers,)
        self.skip_layers = tuple(self.skip_layers)
        if not all(isinstance(p, str) for p in self.skip_layers):
            raise _bad("skip_layers", self.skip_layers, "a sequence of regular-expression strings")

    def require_gradient_reduction(self, reduce_gradients: bool, fix: str) -> None:
        """SP-NGD reduce-scatters local gradients itself, so it needs the adapter to hand it
        local (not Horovod-averaged) gradients and let the engine reduce them.

        Args:
            reduce_gradients: whether the adapter lets the engine average gradients.
            fix: how to fix it with this adapter, for the message.

        Raises:
            ValueError: strategy 'spngd' without gradient reduction.
        """
        if self.strategy is Strategy.SPNGD and not reduce_gradients:
            raise ValueError(f"strategy='spngd' reduce-scatters gradients itself: {fix}")

    def grad_workers(self, world_size: int) -> int:
        """Number of gradient workers per KAISA group for ``world_size`` ranks.

        Raises:
            ValueError: when ``grad_worker_fraction * world_size`` is not an integer that
                divides ``world_size``.
        """
        if self.strategy is Strategy.COMM_OPT:
            return world_size
        if self.strategy is Strategy.MEM_OPT:
            return 1
        workers = self.grad_worker_fraction * world_size
        rounded = int(round(workers))
        if rounded < 1 or abs(workers - rounded) > 1e-9 or world_size % rounded != 0:
            raise ValueError(
                f"invalid grad_worker_fraction={self.grad_worker_fraction!r} for world size "
                f"{world_size}: grad_worker_fraction * world_size must be an integer that divides "
                f"the world size (e.g. one of "
                f"{sorted({d / world_size for d in range(1, world_size + 1) if world_size % d == 0})})"
            )
        return rounded

    def describe(self) -> dict:
        """Plain-dict view (enum values as strings, callables by name) for consistency checks."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            elif hasattr(value, "value"):
                value = value.value
            out[field.name] = value
        return out
