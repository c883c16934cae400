"""Steps with nothing to refresh, as one pure function over frozen curvature.

Between refreshes a K-FAC step only averages gradients, preconditions them with curvature that
does not change, KL-clips them and checks that every rank is healthy and agrees. ``frozen_step``
is that step as a pure function of explicit inputs (no host read, no Python state changed), so
an adapter can compile it: the TF adapter traces it into ``model.fit``'s train step
(``hvd_ngd.tensorflow.graph_step``). Everything that refreshes, fails or disagrees stays with
the engine's eager step: ``frozen_step`` returns a ``bad`` scalar, and any value other than 0
means "discard this result and take the engine's step with the same gradients" (which then
skips, escalates damping or raises ``RankMismatchError`` exactly as it always does).

The engine side is framework-neutral too: ``frozen_plan`` says whether (and how) a world can
take frozen steps, ``steady_steps`` how many of the next steps have nothing due,
``frozen_operands`` what the blocks precondition with, and ``catch_up`` brings the engine's step
count and stale-statistics counts level after frozen steps were taken outside it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd import wire
from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.communicator import Communicator
from hvd_ngd.enums import Strategy
from hvd_ngd.ops.base import Array, ArrayOps

Operands = Tuple[Any, ...]
_TINY = 1e-300  # |lr^2 sum(v . g)| floor: a zero sum gives scale 1, as the engine's rule does


class FrozenMode(enum.Enum):
    """How gradients move in a frozen step."""

    SCATTER = "scatter"  # SP-NGD: reduce-scatter gradients to their owners, all-gather results
    LOCAL = "local"  # KAISA with every rank a gradient worker (comm-opt): precondition locally


@dataclasses.dataclass(frozen=True)
class FrozenPlan:
    """What one rank does in a frozen step (fixed per world).

    Attributes:
        mode: SCATTER or LOCAL.
        layer_order: every registered layer, in engine order (the order of ``grads``).
        owned: SCATTER: the layers each rank preconditions; LOCAL: every rank holds all layers.
        shapes: gradient-matrix shape of every layer.
        rank, world: this rank and the world size.
        reduce: LOCAL: average the gradients over ranks here (they arrive local).
        check_nonfinite: the configuration skips steps with non-finite gradients.
    """

    mode: FrozenMode
    layer_order: Tuple[str, ...]
    owned: Tuple[Tuple[str, ...], ...]
    shapes: Mapping[str, Tuple[int, ...]]
    rank: int
    world: int
    reduce: bool
    check_nonfinite: bool

    @property
    def local(self) -> Tuple[str, ...]:
        """The layers this rank preconditions."""
        return self.owned[self.rank] if self.mode is FrozenMode.SCATTER else self.layer_order


def frozen_plan(engine: Any, reduce_gradients: bool, shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[Optional[FrozenPlan], str]:
    """The frozen-step plan of an engine, or None with the reason it has none.

    Args:
        engine: a ``hvd_ngd.Preconditioner``.
        reduce_gradients: the adapter passes local gradients (``reduce_and_step``'s flag).
        shapes: gradient-matrix shape of every registered layer.
    """
    config, placement = engine.config, engine.placement
    if not engine.layer_order:
        return None, "no registered layer"
    if config.stale_inverse:
        return None, "stale_inverse=True (inverse broadcasts overlap steps)"
    unsupported = [n for n in engine.layer_order if engine.blocks[n].operand_shapes() is None]
    if unsupported:
        return None, f"inverse_method={config.inverse_method.value!r} (frozen steps need 'eigen')"
    if config.strategy is Strategy.SPNGD:
        mode, owned = FrozenMode.SCATTER, tuple(tuple(placement.owned[r]) for r in range(engine.world))
    elif placement.grad_workers == engine.world:
        mode, owned = FrozenMode.LOCAL, ()
    else:
        return None, f"strategy={config.strategy.value!r} broadcasts preconditioned gradients"
    plan = FrozenPlan(
        mode, tuple(engine.layer_order), owned, {n: tuple(shapes[n]) for n in engine.layer_order},
        engine.rank, engine.world, bool(reduce_gradients) and mode is FrozenMode.LOCAL, config.skip_nonfinite_steps,
    )
    return plan, ""


def steady_steps(engine: Any, plan: FrozenPlan, limit: int) -> int:
    """How many of the next steps this rank could take frozen: nothing due, no inverse forced
    after a failure, and curvature for every layer it preconditions (0 otherwise). Local: an
    adapter takes the minimum over ranks."""
    state = engine.state
    if state.force_inverse:
        return 0
    if any(not engine.blocks[n].has_curvature(state.factors, state.inverses) for n in plan.local):
        return 0
    return engine.schedule.tracker.quiet_steps(state.steps, limit)


def frozen_operands(engine: Any, plan: FrozenPlan) -> Dict[str, Operands]:
    """Each locally preconditioned layer's ``CurvatureBlock.operands`` from the engine state."""
    state, ops = engine.state, engine.ops
    return {
        n: engine.blocks[n].operands(ops, state.factors, state.inverses, state.layer_damping[n]) for n in plan.local
    }


def check_values(engine: Any) -> np.ndarray:
    """The engine's compared hyperparameters except ``step`` and ``lr`` (which a frozen step
    takes as inputs), in a fixed order, as float64."""
    values = engine.schedule.compared(engine.state.steps)
    return np.asarray([v for k, v in values.items() if k not in ("step", "lr")], dtype=np.float64)


def catch_up(engine: Any, steps: int) -> None:
    """Account for ``steps`` frozen steps taken outside the engine: step count and the
    stale-statistics counts, as the engine's own steps with nothing due count them."""
    tracker, keys = engine.schedule.tracker, engine.strategy.inverted_keys
    start = engine.state.steps
    for step in range(start, start + steps):
        tracker.due(step)
        if not tracker.skip_all_inverses(step, keys):
            for key in keys:
                if key in engine.state.factors:
                    tracker.inverse_due(step, key)
    engine.state.steps = start + steps


def frozen_step(
    ops: ArrayOps,
    comm: Communicator,
    plan: FrozenPlan,
    blocks: Mapping[str, CurvatureBlock],
    operands: Mapping[str, Sequence[Any]],
    grads: Sequence[Array],
    other_grads: Sequence[Array],
    lr: Array,
    kl_clip: Array,
    check: Array,
) -> Tuple[List[Array], List[Array], Array]:
    """One step with frozen curvature (pure; collectives only through ``comm``).

    Args:
        ops, comm: the adapter's backend and collectives.
        plan: ``frozen_plan`` output.
        blocks: layer -> curvature block.
        operands: layer -> ``CurvatureBlock.operands`` of every layer in ``plan.local``.
        grads: gradient matrices in ``plan.layer_order`` (local, or averaged unless
            ``plan.reduce`` / SCATTER).
        other_grads: gradients that are not preconditioned (averaged here when the gradients
            are local).
        lr, kl_clip: 0-d float64 tensors (``kl_clip`` = inf: no clipping).
        check: 1-d float64 tensor [step, lr, ``check_values``..., the adapter's values...]
            that every rank must agree on.

    Returns:
        Preconditioned (KL-clipped) gradient matrices, the other gradients, and ``bad``: a 0-d
        float64 that is exactly 0 when every rank's gradients and preconditioned gradients
        are finite and every rank's ``check`` matches rank 0's.
    """
    world = plan.world
    local = list(grads) + list(other_grads)
    flag = ops.total_sum(local) if plan.check_nonfinite else ops.zeros((), check)
    row = ops.concat([check, ops.reshape(ops.cast(flag - flag, "float64"), (1,))], 0)
    if world > 1:
        n = ops.shape(row)[0]
        rows = comm.allgather(ops.reshape(row, (1, n)), name="hvd_ngd.frozen.check")
        bad = ops.sum(ops.abs(rows[:, :-1] - rows[0:1, :-1])) + ops.sum(rows[:, -1])
    else:
        bad = row[-1]
    by_name = dict(zip(plan.layer_order, grads))
    sizes = {n: int(np.prod(s)) for n, s in plan.shapes.items()}
    if plan.mode is FrozenMode.SCATTER and world > 1:
        out, vg, other_out = _scatter(ops, comm, plan, blocks, operands, by_name, list(other_grads), sizes)
    else:
        if plan.reduce and world > 1:
            averaged = _average(ops, comm, [by_name[n] for n in plan.layer_order] + list(other_grads), "all")
            by_name = dict(zip(plan.layer_order, averaged[: len(plan.layer_order)]))
            other_out = averaged[len(plan.layer_order) :]
        else:
            other_out = list(other_grads)
        out = {n: blocks[n].apply(ops, by_name[n], operands[n]) for n in plan.layer_order}
        vg = ops.stack([ops.sum(out[n] * by_name[n]) for n in plan.layer_order], 0)
    vg_total = ops.sum(ops.cast(vg, "float64"))
    bad = bad + vg_total * 0.0  # NaN when some preconditioned gradient is not finite
    s = ops.sqrt(kl_clip / ops.maximum(ops.abs(lr * lr * vg_total), _TINY))
    scale = -ops.maximum(-s, -1.0)  # min(1, s); 1 for a zero sum and for kl_clip = inf
    dtype = ops.dtype_name(grads[0])
    scale = ops.cast(scale, dtype)
    return [out[n] * scale for n in plan.layer_order], other_out, bad


def _average(ops: ArrayOps, comm: Communicator, tensors: List[Array], tag: str) -> List[Array]:
    """Average tensors over ranks with one allreduce of their fused buffer (one fixed name: the
    step is traced once)."""
    if not tensors:
        return []
    buf, layout = wire.fuse(ops, tensors)
    return list(wire.unfuse(ops, comm.allreduce(buf, name=f"hvd_ngd.frozen.{tag}", average=True), layout))


def _scatter(
    ops: ArrayOps,
    comm: Communicator,
    plan: FrozenPlan,
    blocks: Mapping[str, CurvatureBlock],
    operands: Mapping[str, Sequence[Any]],
    grads: Mapping[str, Array],
    other_grads: List[Array],
    sizes: Mapping[str, int],
) -> Tuple[Dict[str, Array], Array, List[Array]]:
    """SP-NGD's exchange: reduce-scatter gradients to owners, precondition, all-gather
    [preconditioned gradients, sum(v . g)] of every owner."""
    like = grads[plan.layer_order[0]]
    lengths = [sum(sizes[n] for n in plan.owned[r]) for r in range(plan.world)]
    width = max(lengths)
    rows = []
    for r, n_r in enumerate(lengths):
        parts = [ops.flatten(grads[n]) for n in plan.owned[r]]
        if n_r < width:
            parts.append(ops.zeros((width - n_r,), like))
        rows.append(ops.concat(parts, 0) if len(parts) > 1 else parts[0])
    mine = comm.reducescatter(ops.stack(rows, 0), name="hvd_ngd.frozen.grads", average=True)
    other_out = _average(ops, comm, other_grads, "other")
    owned = plan.owned[plan.rank]
    payload: List[Array] = []
    vg_parts: List[Array] = []
    offset = 0
    for n in owned:
        g = ops.reshape(mine[offset : offset + sizes[n]], plan.shapes[n])
        offset += sizes[n]
        pg = blocks[n].apply(ops, g, operands[n])
        payload.append(ops.flatten(pg))
        vg_parts.append(ops.reshape(ops.sum(pg * g), (1,)))
    payload.extend(vg_parts)
    if not payload:
        payload.append(ops.zeros((0,), like))
    gathered = comm.allgather(ops.concat(payload, 0), name="hvd_ngd.frozen.pgrads")
    out: Dict[str, Array] = {}
    vg: List[Array] = []
    offset = 0
    for r in range(plan.world):
        for n in plan.owned[r]:
            out[n] = ops.reshape(gathered[offset : offset + sizes[n]], plan.shapes[n])
            offset += sizes[n]
        count = len(plan.owned[r])
        if count:
            vg.append(gathered[offset : offset + count])
        offset += count
    return out, ops.concat(vg, 0) if len(vg) > 1 else vg[0], other_out
