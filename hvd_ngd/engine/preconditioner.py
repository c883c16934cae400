"""The framework-neutral preconditioner engine.

One ``Preconditioner`` per rank. Adapters feed it batch statistics (``accumulate``) and gradient
matrices (``step``); it communicates through an injected ``Communicator`` and computes through
an injected ``ArrayOps``, so the same code runs on torch tensors, TF tensors and numpy. It wires
together, once per world:

- the per-layer curvature blocks (``hvd_ngd.blocks``),
- the placement plan (``engine.placement``),
- the schedule: due statistics and scheduled hyperparameters (``engine.schedule``; the
  methods that change and check them are in ``engine.hyperparameters``),
- the state: factors, inverses, damping, step (``engine.state``),
- the factor math and health checks (``engine.curvature``),
- one distribution strategy (``hvd_ngd.strategies``), which owns its own per-step state.

Gradient matrices: K-FAC layers use (out, a_dim) (bias gradient as the last column; Embedding:
weight_grad^T); unit-wise layers use (2, C) = [grad_gamma; grad_beta].
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hvd_ngd.blocks import CurvatureBlock, make_block
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.engine import checkpoint
from hvd_ngd.engine.curvature import Curvature
from hvd_ngd.engine.nonfinite import GradientGuard, NonFiniteGradientWarning  # noqa: F401 (re-export)
from hvd_ngd.engine.hyperparameters import EngineHyperparameters
from hvd_ngd.engine.views import EngineViews
from hvd_ngd.engine.placement import Placement
from hvd_ngd.engine.schedule import SCHEDULABLE, Schedule
from hvd_ngd.engine.state import EngineState
from hvd_ngd.engine.statistics import BatchStatistics
from hvd_ngd.engine.wire_codec import WireCodec
from hvd_ngd.enums import Strategy
from hvd_ngd.keys import StatKey, Statistic
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops.base import Array, ArrayOps
from hvd_ngd.strategies import make_strategy
from hvd_ngd.strategies.base import EngineContext, average_fused


class Preconditioner(EngineHyperparameters, EngineViews):
    """Per-rank K-FAC / SP-NGD engine.

    Args:
        specs: the registered layers, identical (names, order, shapes) on every rank.
        config: validated configuration (never mutated: schedules change ``schedule.values``).
        ops: array backend of the adapter.
        comm: communicator of the adapter.

    Raises:
        ValueError: on duplicate layer names or a configuration that does not fit the world.
    """

    SCHEDULABLE = SCHEDULABLE

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
        self.placement = Placement(specs, config, self.world, self.rank)
        self.blocks: Dict[str, CurvatureBlock] = {
            s.name: make_block(
                s, config.inverse_method, config.pi_correction,
                self.placement.layout(s.name, "A"), self.placement.layout(s.name, "G"), config.damping_rule,
            )
            for s in specs
        }
        self.stat_keys: List[StatKey] = [k for s in specs for k in self.blocks[s.name].statistics]
        self.schedule = Schedule(config, self.stat_keys)
        self.state = EngineState(layer_damping={n: config.damping for n in names})
        self.curvature = Curvature(ops, config, self.blocks, self.state, self.schedule)
        self.codec = WireCodec(ops, self.blocks, config.symmetric_packing, config.wire_dtype)
        self.statistics = BatchStatistics(on_first=self._on_first_statistic)
        self.strategy = make_strategy(
            config.strategy,
            EngineContext(
                ops, comm, config, self.blocks, self.layer_order, self.placement, self.schedule, self.state,
                self.curvature, self.codec, self.statistics,
            ),
        )
        self._checked_step = -1  # the step whose hyperparameters were last compared
        self.guard = GradientGuard(ops, comm, config.skip_nonfinite_steps)
        self.last_step_skipped = False

    def _on_first_statistic(self, key: StatKey, value: Array) -> None:
        self.strategy.on_statistic(key, value)

    def precondition_layer(self, layer: str, grad: Array) -> Array:
        """The natural gradient of one layer's gradient matrix from this rank's curvature."""
        block = self.blocks[layer]
        return block.precondition(self.ops, grad, self.state.factors, self.state.inverses, self.state.layer_damping[layer])

    def has_curvature(self, layer: str) -> bool:
        """Whether this rank holds what preconditioning ``layer`` needs."""
        return self.blocks[layer].has_curvature(self.state.factors, self.state.inverses)

    def layer_owner(self, layer: str) -> int:
        """Rank that preconditions ``layer`` (and computes its inverses unless split)."""
        return self.placement.layer_owner(layer)

    def register_groups(self) -> None:
        """Have the communicator create this plan's process sets (KAISA worker and receiver
        groups), when it manages any (``register_groups``); a collective on Horovod."""
        register = getattr(self.comm, "register_groups", None)
        if register is not None:
            register(list(self.placement.worker_groups) + list(self.placement.receiver_groups))

    # ------------------------------------------------------------------ capture
    def due_statistics(self) -> List[StatKey]:
        """Statistics to compute and communicate at the current step."""
        return list(self.schedule.due(self.state.steps))

    def capture_plan(self) -> Dict[str, Set[str]]:
        """Layer -> statistic kinds ("A", "G", "F") whose batch value is needed this step
        (built once per due pattern; do not modify)."""
        return self.schedule.capture_plan(self.state.steps)

    def accumulate(self, layer: str, statistic: str, value: Array) -> None:
        """Add one micro-batch's statistic (averaged over micro-batches at ``step``); a split
        factor is kept as its diagonal blocks."""
        kind = Statistic(statistic)
        block = self.blocks[layer]
        if kind is Statistic.F or not block.split:
            self.statistics.add(StatKey(layer, kind), value)
            return
        for key, part in block.split_statistic(self.ops, kind, value):
            self.statistics.add(key, part)

    @property
    def skips(self) -> List[Tuple[int, List[int]]]:
        """(step, ranks) of every step skipped for non-finite gradients."""
        return self.guard.skips

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because some rank's gradients were not finite."""
        return len(self.guard.skips)

    # ------------------------------------------------------------------ the step
    def checked(self, layers: Sequence[str], pgrads: Dict[str, Array], grads: Mapping[str, Array]) -> None:
        """Replace non-finite preconditioned gradients by the plain gradient (see
        ``Curvature.checked``)."""
        self.curvature.checked(layers, pgrads, grads)

    def discard_step(self) -> None:
        """Drop what was captured or started for the current step (statistics accumulated, factor
        allreduces in flight): the step will not be taken, e.g. after an elastic reset. Local."""
        self.statistics.clear()
        self.strategy.discard()
        self.curvature.end_step()

    def step(
        self,
        grads: Mapping[str, Array],
        other_grads: Sequence[Array] = (),
        hyperparameters: Optional[Mapping[str, float]] = None,
        lr: Optional[float] = None,
    ) -> Tuple[Dict[str, Array], List[Array]]:
        """Precondition one step's gradients.

        Args:
            grads: layer name -> gradient matrix for every registered layer. For KAISA
                strategies they must already be averaged over ranks; for SPNGD they are local.
            other_grads: gradients of parameters that are not preconditioned. SPNGD averages them
                (one fused allreduce); KAISA returns them unchanged.
            hyperparameters: the adapter's values to compare across ranks besides the engine's
                own (e.g. the optimizer's momentum); see ``check_hyperparameters``.
            lr: the optimizer's current learning rate (KL clipping), when it changed.

        Returns:
            Preconditioned gradient matrices (KL-clipped) and the other gradients.

        Raises:
            RankMismatchError: ranks disagree on the step's hyperparameters.
        """
        if len(grads) < len(self.layer_order) or any(n not in grads for n in self.layer_order):
            missing = [n for n in self.layer_order if n not in grads]
            raise ValueError(f"step() got no gradient for registered layers {missing}")
        if lr is not None and lr != self.schedule.values.lr:
            self.schedule.set(lr=float(lr))
        self.last_step_skipped = False
        self.guard.prepare(list(grads.values()) + list(other_grads), self.state.steps)
        if self.layer_order:
            self.check_hyperparameters(hyperparameters, like=grads[self.layer_order[0]])
        bad = self.guard.decide(self.world, self.state.steps)
        if bad:
            self.guard.record_skip(bad, self.state.steps, self.world, self.strategy.reduces_gradients)
            self.last_step_skipped = True
            self.statistics.clear()
            self.strategy.discard(wait=True)
            self.curvature.end_step()
            self._checked_step = -1  # the same step number comes again
            return dict(grads), list(other_grads)
        self.curvature.forced_now, self.state.force_inverse = set(self.state.force_inverse), set()
        try:
            result = self.strategy.step(grads, other_grads)
        finally:
            self.statistics.clear()
            self.curvature.end_step()
        self.state.steps += 1
        return result

    def reduce_and_step(
        self,
        grads: Mapping[str, Array],
        other_grads: Sequence[Array],
        reduce_gradients: bool,
        hyperparameters: Optional[Mapping[str, float]] = None,
        lr: Optional[float] = None,
    ) -> Tuple[Dict[str, Array], List[Array]]:
        """``step`` for adapters: optionally average local gradients first.

        Args:
            grads: layer name -> gradient matrix.
            other_grads: gradients of parameters that are not preconditioned.
            reduce_gradients: the gradients are local and must be averaged over ranks here
                (SPNGD averages them inside its reduce-scatter; KAISA strategies with one fused
                allreduce first). False when a Horovod optimizer already averaged them.
            hyperparameters: the adapter's values to compare across ranks (see ``step``).
            lr: the optimizer's current learning rate (see ``step``).

        Returns:
            Preconditioned gradient matrices and the (averaged) other gradients.
        """
        if not reduce_gradients or self.strategy.reduces_gradients or self.world == 1:
            pgrads, reduced = self.step(grads, other_grads if reduce_gradients else [], hyperparameters, lr)
            return pgrads, reduced if reduce_gradients else list(other_grads)
        names = list(grads)
        self.guard.prepare(list(grads.values()) + list(other_grads), self.state.steps)
        self.check_hyperparameters(hyperparameters, like=grads[names[0]] if names else None)
        if self.guard.decide(self.world, self.state.steps):  # skipped before the gradients are averaged
            return self.step(grads, other_grads, hyperparameters, lr)
        reduced = average_fused(self.strategy.ctx, [grads[n] for n in names] + list(other_grads), f"grads.s{self.steps}")
        pgrads, _ = self.step(dict(zip(names, reduced[: len(names)])), hyperparameters=hyperparameters, lr=lr)
        return pgrads, reduced[len(names) :]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The complete preconditioner state as numpy arrays and plain Python values.

        A collective: every rank must call it. Factors and inverses held by other ranks (SP-NGD
        owners, KAISA worker groups) are gathered, so the result can be loaded on any world size.
        Scheduled hyperparameters travel with it. Inverses still in flight (``stale_inverse``)
        are completed and saved as pending. See ``engine.checkpoint``.
        """
        return checkpoint.save(self)

    def load_state_dict(self, state: dict, like: Array) -> None:
        """Restore ``state_dict`` output (from this or any other world size).

        Args:
            state: ``state_dict()`` output.
            like: a tensor giving the device of the restored tensors.

        Raises:
            ValueError: when the state was saved with other layers, another inverse method or
                another damping rule.
        """
        checkpoint.load(self, state, like)
