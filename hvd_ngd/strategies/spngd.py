"""SP-NGD strategy: reduce-scatter to owners, precondition, all-gather.

1. Every rank builds one row per owner rank holding the due statistics (one wire buffer) and
   the gradient matrices of the layers that rank owns; rows are padded to equal length and
   reduce-scattered (averaged), so each owner receives exactly the sums it needs
   (ReduceScatterV). Factors and gradients travel in separate buffers because factors may use
   another wire dtype.
2. Owners fold statistics, refresh due inverses and precondition their layers.
3. Each rank all-gathers [its preconditioned gradients, each owned layer's sum(v . g), the
   relative changes of its refreshed statistics (adaptive policy)]; one host read of the
   scalars then gives every rank the KL-clipping sum, the layers whose preconditioned gradient
   is not finite, and the same adaptive-interval decisions.
Gradients of parameters that are not preconditioned are averaged with one fused allreduce.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array
from hvd_ngd.strategies.base import DistributionStrategy, EngineContext, average_fused, changes_vector


class SPNGDStrategy(DistributionStrategy):
    """SP-NGD's ReduceScatterV / AllGatherV step (see the module docstring)."""

    reduces_gradients = True

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self._shapes: Optional[Dict[str, Tuple[int, ...]]] = None
        self._sizes: Dict[str, int] = {}
        self.inverted_keys = [k for n in ctx.placement.owned[ctx.placement.rank] for k in ctx.blocks[n].inverted]
        self._scalar_index: Dict[Tuple[StatKey, ...], Tuple[Array, List[List[StatKey]]]] = {}

    def _layer_shapes(self, grads: Mapping[str, Array]) -> Dict[str, Tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = {n: tuple(self.ctx.ops.shape(grads[n])) for n in self.ctx.layer_order}
            self._sizes = {n: int(np.prod(s)) for n, s in self._shapes.items()}
        return self._shapes

    def _reduce_scatter(self, rows: List[Optional[Array]], lengths: List[int], like: Array, tag: str) -> Optional[Array]:
        """Average per-owner rows; returns this rank's row (trimmed), None when all are empty."""
        ops = self.ctx.ops
        width = max(lengths)
        if width == 0:
            return None
        padded = []
        for row, n in zip(rows, lengths):
            if row is None:
                padded.append(ops.zeros((width,), like))
            elif n < width:
                padded.append(ops.concat([row, ops.zeros((width - n,), row)], 0))
            else:
                padded.append(row)
        mine = self.ctx.comm.reducescatter(ops.stack(padded, 0), name=f"hvd_ngd.{tag}.{width}", average=True)
        return mine[: lengths[self.ctx.placement.rank]]

    def step(self, grads: Mapping[str, Array], other_grads: Sequence[Array]) -> Tuple[Dict[str, Array], List[Array]]:
        ctx = self.ctx
        ops, pl, cur, state = ctx.ops, ctx.placement, ctx.curvature, ctx.state
        step, rank, world = state.steps, pl.rank, pl.world
        if not ctx.layer_order:
            return {}, average_fused(ctx, list(other_grads), f"other.s{step}")
        shapes = self._layer_shapes(grads)
        like = grads[ctx.layer_order[0]]
        due = ctx.schedule.due(step)
        due_by_rank = pl.split_by_owner(due)
        adaptive = ctx.schedule.adaptive

        # 1. ReduceScatterV of due statistics and of gradients to their owners.
        changes: Dict[StatKey, Optional[Array]] = {}
        single = world == 1  # nothing to communicate: skip packing and the collectives
        if due:
            batch = {k: ctx.statistics.mean(k, step) for k in due}
            my_due = due_by_rank[rank]
            if single:
                changes = cur.fold(my_due, [batch[k] for k in my_due])
            else:
                rows = [ctx.codec.encode(keys, [batch[k] for k in keys]) if keys else None for keys in due_by_rank]
                wire_like = next(r for r in rows if r is not None)
                lengths = [ctx.codec.wire_length(keys) for keys in due_by_rank]
                mine = self._reduce_scatter(rows, lengths, wire_like, f"factors.s{step}")
                if my_due:
                    values = ctx.codec.decode(my_due, mine, ops.dtype_name(batch[my_due[0]]))
                    changes = cur.fold(my_due, values)
        sizes = self._sizes
        if single:
            my_grads: Dict[str, Array] = dict(grads)
        else:
            rows = [ops.concat([ops.flatten(grads[n]) for n in pl.owned[r]], 0) if pl.owned[r] else None for r in range(world)]
            mine = self._reduce_scatter(rows, [sum(sizes[n] for n in pl.owned[r]) for r in range(world)], like, f"grads.s{step}")
            my_grads = {}
            offset = 0
            for name in pl.owned[rank]:
                my_grads[name] = ops.reshape(mine[offset : offset + sizes[name]], shapes[name])
                offset += sizes[name]
        reduced_other = average_fused(ctx, list(other_grads), f"other.s{step}")

        # 2. Owners refresh inverses and precondition.
        owned = pl.owned[rank]
        if cur.forced_now or not ctx.schedule.tracker.skip_all_inverses(step, self.inverted_keys):
            for name in owned:
                for key in ctx.blocks[name].inverted:
                    if key in state.factors and cur.inverse_due(key):
                        state.inverses[key] = cur.compute_inverse(key)
        pgrads, computed, vg_names, vg_pieces = cur.precondition(owned, my_grads)

        # 3. AllGatherV of preconditioned gradients, sum(v . g) per layer, statistic changes.
        order = {n: i for i, n in enumerate(vg_names)}
        payload = [] if single else [ops.flatten(pgrads[n]) for n in owned]
        if owned:
            vg = ops.concat(vg_pieces, 0) if len(vg_pieces) > 1 else vg_pieces[0]
            if vg_names != owned:
                vg = ops.take(vg, ops.index(np.asarray([order[n] for n in owned]), vg))
            payload.append(vg)
        if adaptive and due_by_rank[rank]:
            payload.append(changes_vector(ctx, due_by_rank[rank], changes, like))
        if not payload:
            payload.append(ops.zeros((0,), like))
        if single:
            scalars = ops.to_numpy(ops.concat(payload, 0) if len(payload) > 1 else payload[0])  # the one read
            return self._finish(pgrads, scalars, due_by_rank, my_grads, grads, reduced_other)
        gathered = ctx.comm.allgather(ops.concat(payload, 0), name=f"hvd_ngd.pgrads.s{step}")

        out: Dict[str, Array] = {}
        scalar_positions: List[int] = []
        offset = 0
        for r in range(world):
            for name in pl.owned[r]:
                out[name] = ops.reshape(gathered[offset : offset + sizes[name]], shapes[name])
                offset += sizes[name]
            count = len(pl.owned[r]) + (len(due_by_rank[r]) if adaptive else 0)
            scalar_positions.extend(range(offset, offset + count))
            offset += count
        scalars = ops.to_numpy(ops.take(gathered, self._index(due, scalar_positions, gathered)))  # the one read
        return self._finish(out, scalars, due_by_rank, my_grads, grads, reduced_other)

    def _finish(
        self,
        out: Dict[str, Array],
        scalars: np.ndarray,
        due_by_rank: List[List[StatKey]],
        my_grads: Mapping[str, Array],
        grads: Mapping[str, Array],
        reduced_other: List[Array],
    ) -> Tuple[Dict[str, Array], List[Array]]:
        """Read back [sum(v . g) per owned layer, changes] of every rank: KL clipping,
        non-finite layers and adaptive intervals, identically on every rank."""
        ctx = self.ctx
        pl, cur, step = ctx.placement, ctx.curvature, ctx.state.steps
        adaptive = ctx.schedule.adaptive
        vg_total = 0.0
        bad: List[str] = []
        pos = 0
        for r in range(pl.world):
            for name in pl.owned[r]:
                value = float(scalars[pos])
                pos += 1
                if math.isfinite(value):
                    vg_total += value
                else:
                    bad.append(name)
            if adaptive:
                cur.record_changes(step, due_by_rank[r], [float(c) for c in scalars[pos : pos + len(due_by_rank[r])]])
                pos += len(due_by_rank[r])
        if bad:
            vg_total += self._replace_bad(bad, my_grads, out, grads)
        scale = cur.kl_scale(vg_total)
        if scale != 1.0:
            out = {k: v * scale for k, v in out.items()}
        return out, reduced_other

    def _index(self, due: Tuple[StatKey, ...], positions: List[int], like: Array) -> Array:
        entry = self._scalar_index.get(due)
        if entry is None or entry[1] != positions:
            if len(self._scalar_index) > 64:
                self._scalar_index.clear()
            entry = (self.ctx.ops.index(np.asarray(positions, dtype=np.int64), like), positions)
            self._scalar_index[due] = entry
        return entry[0]

    def _replace_bad(
        self, bad: List[str], my_grads: Mapping[str, Array], out: Dict[str, Array], grads: Mapping[str, Array]
    ) -> float:
        """Layers whose preconditioned gradient is not finite: the owner escalates their damping
        and broadcasts the plain averaged gradient instead (rare path). Returns their sum(g . g)."""
        ctx = self.ctx
        ops, pl, cur = ctx.ops, ctx.placement, ctx.curvature
        total = 0.0
        for name in bad:
            owner = pl.owner[name]
            if owner == pl.rank:
                cur.escalate(name)
                plain = my_grads[name]
            else:
                plain = ops.zeros(ops.shape(grads[name]), grads[name])
            plain = ctx.comm.broadcast(plain, owner, name=f"hvd_ngd.plain.{name}.s{ctx.state.steps}")
            out[name] = plain
            total += ops.to_float(ops.sum(plain * plain))
        return total
