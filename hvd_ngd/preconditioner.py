"""The framework-neutral preconditioner engine.

One ``Preconditioner`` per rank owns the running factors, inverses and stale-statistics state
of the layers it is responsible for. Adapters feed it batch statistics (``accumulate``) and
gradient matrices (``step``); it communicates through an injected ``Communicator`` and computes
through an injected ``ArrayOps``, so the same code runs on torch tensors, TF tensors and numpy.

Gradient matrices: K-FAC layers use (out, a_dim) (bias gradient as the last column; Embedding:
weight_grad^T); unit-wise layers use (2, C) = [grad_gamma; grad_beta].
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hvd_ngd import assignment, consistency, damping, inverse, kl_clip, running_average, stale, unitwise, wire
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig, resolve_interval
from hvd_ngd.enums import AssignmentCost, IntervalPolicy, InverseMethod, Strategy
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps

logger = logging.getLogger("hvd_ngd")

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


class CurvatureWarning(RuntimeWarning):
    """A layer fell back to its plain gradient because its curvature was not usable."""


def stat_name(layer: str, statistic: str) -> str:
    """Name of one statistic ("A", "G" or "F") of a layer."""
    return f"{layer}/{statistic}"


def statistics_of(spec: LayerSpec) -> Tuple[str, ...]:
    """Statistic kinds a layer keeps."""
    return ("F",) if spec.kind.is_unitwise else ("A", "G")


class Preconditioner:
    """Per-rank K-FAC / SP-NGD engine.

    Args:
        specs: the registered layers, identical (names, order, shapes) on every rank.
        config: validated configuration.
        ops: array backend of the adapter.
        comm: communicator of the adapter.

    Raises:
        ValueError: on duplicate layer names or a configuration that does not fit the world.
    """

    def __init__(self, specs: Sequence[LayerSpec], config: KFACConfig, ops: ArrayOps, comm: Communicator) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate layer names: {dup}")
        if config.stale_inverse and config.strategy in (Strategy.SPNGD, Strategy.MEM_OPT):
            raise ValueError(
                f"invalid stale_inverse=True with strategy={config.strategy.value!r}: stale-inverse "
                "distribution overlaps inverse broadcasts, which only comm-opt and hybrid send"
            )
        self.specs: Dict[str, LayerSpec] = {s.name: s for s in specs}
        self.layer_order: List[str] = names
        self.config = config
        self.ops = ops
        self.comm = comm
        self.world = comm.size
        self.rank = comm.rank
        self.grad_workers = 1 if config.strategy is Strategy.SPNGD else config.grad_workers(self.world)
        split = config.strategy is Strategy.COMM_OPT and config.assignment_cost is not AssignmentCost.COMMUNICATION
        self.plan = assignment.assign(list(specs), self.world, config.assignment_cost, split_factors=split)
        self.worker_groups = assignment.grad_worker_groups(self.world, self.grad_workers)
        self.receiver_groups = assignment.grad_receiver_groups(self.world, self.grad_workers)
        self.stat_names: List[str] = [stat_name(s.name, k) for s in specs for k in statistics_of(s)]
        self.tracker = stale.StalenessTracker(config, self.stat_names)
        self.steps = 0
        self.layer_damping: Dict[str, float] = {n: config.damping for n in names}
        self.force_inverse: Set[str] = set()  # to recompute at the next step (after a failure)
        self._forced_now: Set[str] = set()
        self.factors: Dict[str, Array] = {}
        self.inverses: Dict[str, inverse.FactorInverse] = {}
        self.pending: Dict[str, Tuple[List[object], bool, bool]] = {}
        self._accumulated: Dict[str, Tuple[Array, int]] = {}
        self._due: Optional[List[str]] = None
        self.fallbacks: List[Tuple[int, str, str]] = []
        self._fallen: Set[str] = set()
        self.last_changes: Dict[str, Optional[float]] = {}
        self.overlap = True  # start factor allreduces from the hooks (KAISA)
        self.inflight: Dict[str, object] = {}
        self._checked_step = -1  # the step whose hyperparameters were last compared

    def register_groups(self) -> None:
        """Have the communicator create this plan's process sets (KAISA worker and receiver
        groups), when it manages any (``register_groups``); a collective on Horovod."""
        register = getattr(self.comm, "register_groups", None)
        if register is not None:
            register(list(self.worker_groups) + list(self.receiver_groups))

    # ------------------------------------------------------------------ schedule / capture
    def due_statistics(self) -> List[str]:
        """Statistics to compute and communicate at the current step (cached per step)."""
        if self._due is None:
            self._due = list(self.tracker.due(self.steps))
        return self._due

    def capture_plan(self) -> Dict[str, Set[str]]:
        """Layer -> statistic kinds ("A", "G", "F") whose batch value is needed this step."""
        plan: Dict[str, Set[str]] = {}
        for name in self.due_statistics():
            layer, kind = name.rsplit("/", 1)
            plan.setdefault(layer, set()).add(kind)
        return plan

    def accumulate(self, layer: str, statistic: str, value: Array) -> None:
        """Add one micro-batch's statistic (averaged over accumulation steps at ``step``).

        KAISA strategies start averaging the statistic over ranks at once (an asynchronous
        allreduce overlapping the rest of forward/backward). A second micro-batch for the same
        statistic (gradient accumulation) invalidates that early send; ``step`` then sends the
        mean synchronously and later steps stop sending early.
        """
        key = stat_name(layer, statistic)
        if key in self._accumulated:
            total, count = self._accumulated[key]
            self._accumulated[key] = (total + value, count + 1)
            self.overlap = False
            return
        self._accumulated[key] = (value, 1)
        if self.overlap and self.config.strategy is not Strategy.SPNGD:
            self.inflight[key] = self.comm.allreduce_async(
                self.factor_to_wire(key, value), name=f"hvd_ngd.factor.{key}", average=True
            )

    def batch_statistic(self, key: str) -> Array:
        """Mean of the accumulated micro-batch values of one due statistic."""
        if key not in self._accumulated:
            layer = key.rsplit("/", 1)[0]
            raise RuntimeError(
                f"layer {layer!r} produced no curvature statistics at step {self.steps}: its hooks never "
                "fired (is its weight used functionally, or was the layer not part of the forward/backward "
                "pass?). Exclude it with skip_layers, or run forward and backward before step()."
            )
        total, count = self._accumulated[key]
        return total if count == 1 else total / count

    # ------------------------------------------------------------------ owners and groups
    def layer_owner(self, layer: str) -> int:
        """Rank that preconditions ``layer`` (and computes its inverses unless split)."""
        return self.plan.layer_owner[layer]

    def inverse_worker(self, layer: str, statistic: str) -> int:
        """Rank that computes the inverse of one statistic."""
        return self.plan.owner(layer, statistic)

    def worker_group(self, layer: str) -> List[int]:
        """KAISA gradient-worker group of ``layer`` (holds its inverses and preconditions it)."""
        owner = self.layer_owner(layer)
        for group in self.worker_groups:
            if owner in group:
                return group
        raise AssertionError("owner not in any worker group")  # pragma: no cover

    # ------------------------------------------------------------------ wire formats
    def nbytes(self, x: Array) -> int:
        """Size of a tensor in bytes."""
        n = 1
        for d in self.ops.shape(x):
            n *= d
        return n * _ITEMSIZE.get(self.ops.dtype_name(x), 4)

    def factor_to_wire(self, key: str, value: Array) -> Array:
        """Pack (upper triangle) and cast a factor for sending."""
        spec = self.specs[key.rsplit("/", 1)[0]]
        flat = value
        is_matrix = len(self.ops.shape(value)) == 2 and not spec.kind.is_unitwise
        if is_matrix and self.config.symmetric_packing:
            flat = wire.pack_symmetric(self.ops, value)
        else:
            flat = self.ops.flatten(value)
        return wire.to_wire(self.ops, flat, self.config.wire_dtype)

    def factor_from_wire(self, key: str, flat: Array, like: Array) -> Array:
        """Inverse of ``factor_to_wire`` (``like`` gives shape and dtype)."""
        spec = self.specs[key.rsplit("/", 1)[0]]
        shape = self.ops.shape(like)
        value = wire.from_wire(self.ops, flat, self.ops.dtype_name(like))
        is_matrix = len(shape) == 2 and not spec.kind.is_unitwise
        if is_matrix and self.config.symmetric_packing:
            return wire.unpack_symmetric(self.ops, value, shape[0])
        return self.ops.reshape(value, shape)

    def allreduce_fused(self, tensors: List[Array], tag: str) -> List[Array]:
        """Average a list of tensors over all ranks in fused buckets."""
        out: List[Array] = [None] * len(tensors)
        if not tensors:
            return out
        sizes = [self.nbytes(t) for t in tensors]
        for k, idx in enumerate(wire.bucket(sizes, self.config.fusion_threshold_bytes)):
            buf, layout = wire.fuse(self.ops, [tensors[i] for i in idx])
            buf = self.comm.allreduce(buf, name=f"hvd_ngd.{tag}.{k}.{self.ops.shape(buf)[0]}", average=True)
            for i, t in zip(idx, wire.unfuse(self.ops, buf, layout)):
                out[i] = t
        return out

    # ------------------------------------------------------------------ factor math
    def fold(self, key: str, batch_value: Array) -> Optional[float]:
        """Fold an averaged batch statistic into the running average.

        Returns:
            The relative change of the running statistic, or None when the batch value was not
            finite (then it is not folded and the layer falls back this step).
        """
        if not self.ops.all_finite(batch_value):
            self.fall_back(key.rsplit("/", 1)[0], f"non-finite statistic {key}")
            return None
        previous = self.factors.get(key)
        updated = running_average.ema(self.ops, previous, batch_value, self.config.factor_decay)
        self.factors[key] = updated
        return stale.relative_change(self.ops, updated, previous)

    def compute_inverse(self, layer: str, statistic: str) -> inverse.FactorInverse:
        """Invert (or decompose) one running factor of ``layer``."""
        spec = self.specs[layer]
        a = self.factors[stat_name(layer, "A")]
        g = self.factors[stat_name(layer, "G")]
        diagonal = statistic == "A" and spec.a_is_diagonal
        try:
            share = 0.0
            if self.config.inverse_method is InverseMethod.CHOLESKY:
                da, dg = damping.cholesky_damping(
                    self.ops, a, g, self.layer_damping[layer], self.config.pi_correction, a_is_diagonal=spec.a_is_diagonal,
                    rule=self.config.damping_rule,
                )
                share = da if statistic == "A" else dg
            factor = a if statistic == "A" else g
            return inverse.invert_factor(self.ops, factor, self.config.inverse_method, share, diagonal=diagonal)
        except Exception as exc:  # noqa: BLE001 - any backend's linear-algebra failure
            # A NaN inverse travels like a good one, so every rank that uses it falls back alike.
            warnings.warn(
                f"hvd_ngd: inverting {stat_name(layer, statistic)} failed at step {self.steps} ({exc}); "
                "the layer uses its plain gradient until a decomposition succeeds",
                CurvatureWarning,
                stacklevel=2,
            )
            tensors = [t * float("nan") for t in self.inverse_template(layer, statistic)]
            return inverse.inverse_from_tensors(self.ops, self.config.inverse_method, diagonal, tensors)

    def inverse_due(self, layer: str, statistic: str) -> bool:
        """Whether an inverse is recomputed now: by schedule, or after a failure at the last step."""
        key = stat_name(layer, statistic)
        due = self.tracker.inverse_due(self.steps, key)
        return due or key in self._forced_now

    def inverse_template(self, layer: str, statistic: str) -> List[Array]:
        """Zero tensors shaped like the wire form of an inverse (for receiving a broadcast)."""
        spec = self.specs[layer]
        n = spec.a_dim if statistic == "A" else spec.g_dim
        diagonal = statistic == "A" and spec.a_is_diagonal
        like = self.factors[stat_name(layer, statistic)]
        dtype = "float64" if self.ops.dtype_name(like) == "float64" else "float32"
        like = self.ops.cast(like, dtype)
        if self.config.inverse_method is InverseMethod.EIGEN:
            vals = self.ops.zeros((n,), like)
            return [vals] if diagonal else [vals, self.ops.zeros((n, n), like)]
        return [self.ops.zeros((n,) if diagonal else (n, n), like)]

    def precondition_layer(self, layer: str, grad: Array) -> Array:
        """Natural gradient of one layer from its current inverses (or unit-wise Fisher)."""
        spec = self.specs[layer]
        if spec.kind.is_unitwise:
            fisher = self.factors[stat_name(layer, "F")]
            lam = damping.unitwise_damping(self.ops, fisher, self.layer_damping[layer], self.config.damping_rule)
            pg, pb = unitwise.unitwise_precondition(self.ops, fisher, grad[0], grad[1], lam)
            return self.ops.stack([pg, pb], 0)
        a_inv, g_inv = self.inverses[stat_name(layer, "A")], self.inverses[stat_name(layer, "G")]
        lam = damping.kronecker_damping(self.ops, a_inv.eigvals, g_inv.eigvals, self.layer_damping[layer], self.config.damping_rule)
        return inverse.precondition_kronecker(self.ops, grad, a_inv, g_inv, lam)

    def has_curvature(self, layer: str) -> bool:
        """Whether the layer has what ``precondition_layer`` needs."""
        spec = self.specs[layer]
        if spec.kind.is_unitwise:
            return stat_name(layer, "F") in self.factors
        return stat_name(layer, "A") in self.inverses and stat_name(layer, "G") in self.inverses

    def fall_back(self, layer: str, reason: str) -> None:
        """Record and warn that ``layer`` uses its plain gradient at this step."""
        self.fallbacks.append((self.steps, layer, reason))
        self._fallen.add(layer)
        warnings.warn(
            f"hvd_ngd: layer {layer!r} uses its plain gradient at step {self.steps}: {reason}",
            CurvatureWarning,
            stacklevel=3,
        )

    def fell_back(self, layer: str) -> bool:
        """Whether ``layer`` already fell back to its plain gradient at this step."""
        return layer in self._fallen

    def checked(self, layers: Sequence[str], pgrads: Dict[str, Array], grads: Mapping[str, Array]) -> None:
        """Replace non-finite preconditioned gradients by the plain gradient (one host sync)."""
        if not layers:
            return
        sums = self.ops.stack([self.ops.sum(pgrads[n]) for n in layers], 0)
        if self.ops.all_finite(sums):
            return
        for n in layers:
            if not self.ops.all_finite(pgrads[n]):
                old = self.layer_damping[n]
                self.layer_damping[n] = min(self.config.max_damping, old * 10.0)
                self.fall_back(
                    n,
                    "non-finite preconditioned gradient (singular or non-finite curvature); damping "
                    f"{old:g} -> {self.layer_damping[n]:g}, inverses recomputed next step",
                )
                pgrads[n] = grads[n]
                if not self.specs[n].kind.is_unitwise:
                    self.force_inverse.update({stat_name(n, "A"), stat_name(n, "G")})

    def kl_scale(self, vg_sum: Array) -> float:
        """KL-clipping scale from sum(v . g) over all layers."""
        if self.config.kl_clip is None:
            return 1.0
        value = vg_sum if isinstance(vg_sum, float) else self.ops.to_float(vg_sum)
        return kl_clip.kl_clip_scale_from_sum(value, self.config.lr, self.config.kl_clip)

    def vg_sum(self, layers: Sequence[str], pgrads: Mapping[str, Array], grads: Mapping[str, Array]) -> Array:
        """sum over layers of sum(v * g)."""
        total = None
        for n in layers:
            term = self.ops.sum(pgrads[n] * grads[n])
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ schedules
    SCHEDULABLE = ("lr", "damping", "factor_decay", "kl_clip", "factor_update_interval", "inv_update_interval")

    def set_hyperparameters(self, **values: Any) -> None:
        """Change hyperparameters between steps (a schedule); every rank must do the same.

        ``damping`` keeps each layer's escalation factor (a layer whose damping was raised after
        failures stays that many times above the new base, capped by ``max_damping``); with the
        Cholesky method, whose inverses hold the damping, every inverse is recomputed at the next
        step. The per-step consistency check reports ranks that scheduled differently.

        Args:
            **values: new values of ``SCHEDULABLE`` fields (validated as ``KFACConfig`` does).

        Raises:
            ValueError: an unknown or unschedulable name, or an invalid value (named).
        """
        unknown = sorted(set(values) - set(self.SCHEDULABLE))
        if unknown:
            raise ValueError(f"cannot schedule {unknown}: schedulable hyperparameters are {list(self.SCHEDULABLE)}")
        dataclasses.replace(self.config, **values)  # validates, naming the parameter
        old_damping = self.config.damping
        for name, value in values.items():
            setattr(self.config, name, value)
        if "damping" in values and values["damping"] != old_damping:
            for n, current in self.layer_damping.items():
                self.layer_damping[n] = min(self.config.max_damping, values["damping"] * (current / old_damping))
            if self.config.inverse_method is InverseMethod.CHOLESKY:
                self.force_inverse.update(
                    stat_name(s.name, k) for s in self.specs.values() if not s.kind.is_unitwise for k in ("A", "G")
                )

    def scheduled_hyperparameters(self) -> Dict[str, Any]:
        """Current values of the ``SCHEDULABLE`` fields (intervals given as callables of the step
        are left out: every rank builds them alike). Saved by ``state_dict``."""
        values: Dict[str, Any] = {}
        for name in self.SCHEDULABLE:
            value = getattr(self.config, name)
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                values[name] = value
        return values

    def load_hyperparameters(self, values: Mapping[str, Any]) -> None:
        """Set ``scheduled_hyperparameters`` output as it was saved (no per-layer rescaling:
        per-layer damping is restored with the rest of the state)."""
        for name, value in values.items():
            setattr(self.config, name, value)

    def discard_step(self) -> None:
        """Drop what was captured or started for the current step (statistics accumulated, factor
        allreduces in flight): the step will not be taken, e.g. after an elastic reset. Local."""
        self._accumulated.clear()
        self.inflight.clear()
        self._fallen.clear()
        self._due = None

    # ------------------------------------------------------------------ the step
    def hyperparameters(self, extra: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """The values every rank must agree on at this step (see ``check_hyperparameters``).

        Args:
            extra: values the adapter adds, e.g. the optimizer's ``optimizer.momentum``.
        """
        cfg = self.config
        values: Dict[str, float] = {
            "step": float(self.steps),
            "lr": float(cfg.lr),
            "damping": float(cfg.damping),
            "factor_decay": float(cfg.factor_decay),
            "kl_clip": -1.0 if cfg.kl_clip is None else float(cfg.kl_clip),
        }
        if cfg.interval_policy is IntervalPolicy.FIXED:
            for name in ("factor_update_interval", "inv_update_interval"):
                values[name] = float(resolve_interval(name, getattr(cfg, name), self.steps))
        values.update({k: float(v) for k, v in (extra or {}).items()})
        return values

    def check_hyperparameters(self, extra: Optional[Mapping[str, float]] = None, like: Optional[Array] = None) -> None:
        """Raise ``RankMismatchError`` on every rank when ranks step with different values.

        Runs every ``consistency_check_interval`` steps on more than one rank: one allgather of
        a few float64 values, before any gradient of the step is communicated.
        """
        every = self.config.consistency_check_interval
        if self.world == 1 or not every or self.steps % every or self._checked_step == self.steps:
            return
        # Per-layer damping is escalated only where a layer is preconditioned (its SP-NGD owner
        # or KAISA gradient workers): the same allgather shares the largest value with every rank.
        shared = {f"layer_damping.{n}": d for n, d in self.layer_damping.items()}
        merged = consistency.check_hyperparameters(
            self.comm, self.ops, self.hyperparameters(extra), self.steps, like, shared_max=shared
        )
        self.layer_damping = {n: merged[f"layer_damping.{n}"] for n in self.layer_damping}
        self._checked_step = self.steps

    def step(
        self,
        grads: Mapping[str, Array],
        other_grads: Sequence[Array] = (),
        hyperparameters: Optional[Mapping[str, float]] = None,
    ) -> Tuple[Dict[str, Array], List[Array]]:
        """Precondition one step's gradients.

        Args:
            grads: layer name -> gradient matrix for every registered layer. For KAISA
                strategies they must already be averaged over ranks; for SPNGD they are local.
            other_grads: gradients of parameters that are not preconditioned. SPNGD averages them
                (one fused allreduce); KAISA returns them unchanged.
            hyperparameters: the adapter's values to compare across ranks besides the engine's
                own (e.g. the optimizer's momentum); see ``check_hyperparameters``.

        Returns:
            Preconditioned gradient matrices (KL-clipped) and the other gradients.

        Raises:
            RankMismatchError: ranks disagree on the step's hyperparameters.
        """
        missing = [n for n in self.layer_order if n not in grads]
        if missing:
            raise ValueError(f"step() got no gradient for registered layers {missing}")
        self.check_hyperparameters(hyperparameters, like=grads[self.layer_order[0]])
        from hvd_ngd.strategies import kaisa, spngd  # local import: strategies import this module

        self.due_statistics()
        self._forced_now, self.force_inverse = self.force_inverse, set()
        if self.config.strategy is Strategy.SPNGD:
            result = spngd.step(self, grads, other_grads)
        else:
            result = kaisa.step(self, grads), list(other_grads)
        self._accumulated.clear()
        self.inflight.clear()
        self._fallen.clear()
        self._due = None
        self.steps += 1
        return result

    def reduce_and_step(
        self,
        grads: Mapping[str, Array],
        other_grads: Sequence[Array],
        reduce_gradients: bool,
        hyperparameters: Optional[Mapping[str, float]] = None,
    ) -> Tuple[Dict[str, Array], List[Array]]:
        """``step`` for adapters: optionally average local gradients first.

        Args:
            grads: layer name -> gradient matrix.
            other_grads: gradients of parameters that are not preconditioned.
            reduce_gradients: the gradients are local and must be averaged over ranks here
                (SPNGD averages them inside its reduce-scatter; KAISA strategies with one fused
                allreduce first). False when a Horovod optimizer already averaged them.
            hyperparameters: the adapter's values to compare across ranks (see ``step``).

        Returns:
            Preconditioned gradient matrices and the (averaged) other gradients.
        """
        if not reduce_gradients or self.config.strategy is Strategy.SPNGD:
            pgrads, reduced = self.step(grads, other_grads if reduce_gradients else [], hyperparameters)
            return pgrads, reduced if reduce_gradients else list(other_grads)
        names = list(grads)
        self.check_hyperparameters(hyperparameters, like=grads[names[0]] if names else None)
        reduced = self.allreduce_fused([grads[n] for n in names] + list(other_grads), f"grads.s{self.steps}")
        pgrads, _ = self.step(dict(zip(names, reduced[: len(names)])), hyperparameters=hyperparameters)
        return pgrads, reduced[len(names) :]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The complete preconditioner state as numpy arrays and plain Python values.

        A collective: every rank must call it. Factors and inverses held by other ranks (SP-NGD
        owners, KAISA worker groups) are gathered, so the result can be loaded on any world size.
        Scheduled hyperparameters (``scheduled_hyperparameters``) travel with it.
        Inverses still in flight (``stale_inverse``) are completed and saved as pending.
        """
        for key, (handles, diagonal, remote) in list(self.pending.items()):
            tensors = [self.comm.wait(h) for h in handles] if remote else handles
            self.pending[key] = (tensors, diagonal, False)
        local = {
            "factors": {k: self.ops.to_numpy(v) for k, v in self.factors.items()},
            "inverses": {k: [self.ops.to_numpy(t) for t in inverse.inverse_to_tensors(v)] for k, v in self.inverses.items()},
            "layer_damping": dict(self.layer_damping),
            "force_inverse": sorted(self.force_inverse),
        }
        merged: Dict[str, dict] = {"factors": {}, "inverses": {}}
        everyone = self.comm.allgather_object(local, name="hvd_ngd.state_dict") if self.world > 1 else [local]
        for part in reversed(everyone):  # the lowest rank holding a value wins
            merged["factors"].update(part["factors"])
            merged["inverses"].update(part["inverses"])
        # Escalated damping and forced inverses live where the layer was preconditioned.
        layer_damping = {n: max(p["layer_damping"][n] for p in everyone) for n in self.layer_damping}
        force_inverse = sorted(set().union(*(p["force_inverse"] for p in everyone)))
        return {
            "steps": self.steps,
            "method": self.config.inverse_method.value,
            "damping_rule": self.config.damping_rule.value,
            "hyperparameters": self.scheduled_hyperparameters(),
            "layer_damping": layer_damping,
            "force_inverse": force_inverse,
            "tracker": self.tracker.state_dict(),
            "factors": merged["factors"],
            "inverses": merged["inverses"],
            "pending": {k: [self.ops.to_numpy(t) for t in v[0]] for k, v in self.pending.items()},
        }

    def _holds(self, key: str) -> bool:
        """Whether this rank keeps a statistic (SP-NGD: owners only; KAISA: everyone)."""
        if self.config.strategy is not Strategy.SPNGD:
            return True
        return self.layer_owner(key.rsplit("/", 1)[0]) == self.rank

    def load_state_dict(self, state: dict, like: Array) -> None:
        """Restore ``state_dict`` output (from this or any other world size).

        Args:
            state: ``state_dict()`` output.
            like: a tensor giving the device of the restored tensors.

        Raises:
            ValueError: when the state was saved with other layers or another inverse method.
        """
        if state["method"] != self.config.inverse_method.value:
            raise ValueError(
                f"checkpoint inverses were computed with inverse_method={state['method']!r}, "
                f"this preconditioner uses {self.config.inverse_method.value!r}"
            )
        saved_rule = state.get("damping_rule", "absolute")  # states saved before damping_rule existed
        if saved_rule != self.config.damping_rule.value:
            raise ValueError(
                f"checkpoint per-layer damping was saved with damping_rule={saved_rule!r}, this preconditioner "
                f"uses {self.config.damping_rule.value!r}: construct it with damping_rule={saved_rule!r}"
            )
        unknown = sorted(set(state["factors"]) - set(self.stat_names))
        if unknown:
            raise ValueError(f"checkpoint holds statistics of layers this model does not register: {unknown}")
        self.load_hyperparameters(state.get("hyperparameters", {}))
        self.steps = int(state["steps"])
        self._checked_step = -1
        self.layer_damping = {k: float(v) for k, v in state["layer_damping"].items()}
        self.force_inverse = set(state["force_inverse"])
        self.tracker.load_state_dict(state["tracker"])
        self.factors = {k: self.ops.from_numpy(v, like=like) for k, v in state["factors"].items() if self._holds(k)}

        def rebuild(key: str, tensors: list) -> inverse.FactorInverse:
            layer, statistic = key.rsplit("/", 1)
            diagonal = statistic == "A" and self.specs[layer].a_is_diagonal
            return inverse.inverse_from_tensors(
                self.ops, self.config.inverse_method, diagonal, [self.ops.from_numpy(t, like=like) for t in tensors]
            )

        self.inverses = {k: rebuild(k, v) for k, v in state["inverses"].items() if self._holds(k)}
        self.pending = {}
        for key, tensors in state["pending"].items():
            layer, statistic = key.rsplit("/", 1)
            diagonal = statistic == "A" and self.specs[layer].a_is_diagonal
            self.pending[key] = ([self.ops.from_numpy(t, like=like) for t in tensors], diagonal, False)
