"""SP-NGD strategy: reduce-scatter to owners, precondition, all-gather.

1. Every rank builds one row per owner rank holding the due statistics and the gradient
   matrices of the layers that rank owns; rows are padded to equal length and reduce-scattered
   (averaged), so each owner receives exactly the sums it needs (ReduceScatterV). Factors and
   gradients travel in separate buffers because factors may use a different wire dtype.
2. Owners fold statistics, refresh due inverses and precondition their layers.
3. Each rank all-gathers [its preconditioned gradients, its partial sum(v . g) for KL
   clipping, the relative changes of its refreshed statistics]; every rank then has every
   preconditioned gradient and applies the same adaptive-interval decisions.
Gradients of parameters that are not preconditioned are averaged with one fused allreduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from hvd_ngd.ops.base import Array

if TYPE_CHECKING:  # pragma: no cover
    from hvd_ngd.preconditioner import Preconditioner


def _numel(engine: "Preconditioner", x: Array) -> int:
    n = 1
    for d in engine.ops.shape(x):
        n *= d
    return n


def _reduce_scatter_rows(engine: "Preconditioner", rows: List[List[Array]], like: Array, tag: str) -> List[Array]:
    """Reduce-scatter per-owner lists of flat tensors; returns this rank's averaged pieces."""
    ops = engine.ops
    flat_rows = [ops.concat(r, 0) if r else ops.zeros((0,), like) for r in rows]
    lengths = [ops.shape(r)[0] for r in flat_rows]
    width = max(lengths)
    if width == 0:
        return []
    padded = [
        r if n == width else ops.concat([r, ops.zeros((width - n,), r)], 0) for r, n in zip(flat_rows, lengths)
    ]
    mine = engine.comm.reducescatter(ops.stack(padded, 0), name=f"hvd_ngd.{tag}.{width}", average=True)
    pieces: List[Array] = []
    offset = 0
    for t in rows[engine.rank]:
        n = _numel(engine, t)
        pieces.append(mine[offset : offset + n])
        offset += n
    return pieces


def _owned(engine: "Preconditioner", rank: int) -> List[str]:
    return [n for n in engine.layer_order if engine.layer_owner(n) == rank]


def step(
    engine: "Preconditioner", grads: Mapping[str, Array], other_grads: Sequence[Array]
) -> Tuple[Dict[str, Array], List[Array]]:
    """One SP-NGD step on local (not yet averaged) gradients."""
    ops = engine.ops
    world = engine.world
    due = engine.due_statistics()
    owners = {n: engine.layer_owner(n) for n in engine.layer_order}
    due_by_rank: List[List[str]] = [[k for k in due if owners[k.rsplit("/", 1)[0]] == r] for r in range(world)]
    owned = [_owned(engine, r) for r in range(world)]
    like = grads[engine.layer_order[0]] if engine.layer_order else None

    # 1. ReduceScatterV of due statistics and of gradients to their owners.
    batch = {k: engine.batch_statistic(k) for k in due}
    if due:
        rows = [[engine.factor_to_wire(k, batch[k]) for k in due_by_rank[r]] for r in range(world)]
        wire_like = next(t for row in rows for t in row)
        pieces = _reduce_scatter_rows(engine, rows, wire_like, f"factors.s{engine.steps}")
        for key, flat in zip(due_by_rank[engine.rank], pieces):
            change = engine.fold(key, engine.factor_from_wire(key, flat, batch[key]))
            engine.last_changes[key] = change
    my_grads: Dict[str, Array] = {}
    if engine.layer_order:
        rows = [[ops.flatten(grads[n]) for n in owned[r]] for r in range(world)]
        pieces = _reduce_scatter_rows(engine, rows, like, f"grads.s{engine.steps}")
        for name, flat in zip(owned[engine.rank], pieces):
            my_grads[name] = ops.reshape(flat, ops.shape(grads[name]))
    reduced_other = engine.allreduce_fused(list(other_grads), f"other.s{engine.steps}")

    # 2. Owners refresh inverses and precondition.
    for key in [k for k in engine.stat_names if owners[k.rsplit("/", 1)[0]] == engine.rank]:
        layer, statistic = key.rsplit("/", 1)
        if statistic == "F" or key not in engine.factors or not engine.inverse_due(layer, statistic):
            continue
        engine.inverses[key] = engine.compute_inverse(layer, statistic)
    pgrads: Dict[str, Array] = {}
    computed = []
    for name in owned[engine.rank]:
        if engine.has_curvature(name) and not engine.fell_back(name):
            pgrads[name] = engine.precondition_layer(name, my_grads[name])
            computed.append(name)
        else:
            pgrads[name] = my_grads[name]
    engine.checked(computed, pgrads, my_grads)

    # 3. AllGatherV of preconditioned gradients, KL partial sums and statistic changes.
    if like is None:
        return {}, reduced_other
    payload = [ops.flatten(pgrads[n]) for n in owned[engine.rank]]
    partial = engine.vg_sum(owned[engine.rank], pgrads, my_grads)
    payload.append(ops.reshape(partial if partial is not None else ops.zeros((), like), (1,)))
    changes = [engine.last_changes.get(k) for k in due_by_rank[engine.rank]]
    if changes:
        values = np.asarray([-1.0 if c is None else c for c in changes], dtype=ops.dtype_name(like))
        payload.append(ops.from_numpy(values, like))
    gathered = engine.comm.allgather(ops.concat(payload, 0), name=f"hvd_ngd.pgrads.s{engine.steps}")
    engine.last_changes.clear()

    out: Dict[str, Array] = {}
    offset = 0
    scalar_index: List[int] = []  # positions of [partial_r, changes of r...] for every rank r
    for r in range(world):
        for name in owned[r]:
            n = _numel(engine, grads[name])
            out[name] = ops.reshape(gathered[offset : offset + n], ops.shape(grads[name]))
            offset += n
        count = 1 + (len(due_by_rank[r]) if due_by_rank[r] else 0)
        scalar_index.extend(range(offset, offset + count))
        offset += count
    scalars = ops.to_numpy(ops.concat([gathered[i : i + 1] for i in scalar_index], 0))  # one host sync
    vg_total = 0.0
    pos = 0
    for r in range(world):
        vg_total = vg_total + float(scalars[pos])
        pos += 1
        for key in due_by_rank[r]:
            change = float(scalars[pos])
            pos += 1
            if change >= 0.0:
                engine.tracker.record_refresh(key, engine.steps, change)
    scale = engine.kl_scale(vg_total)
    if scale != 1.0:
        out = {k: v * scale for k, v in out.items()}
    return out, reduced_other
