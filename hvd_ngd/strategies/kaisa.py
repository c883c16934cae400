"""KAISA strategies (COMM-OPT, MEM-OPT, HYBRID) on already-averaged gradients.

1. Due factors are averaged over all ranks (packed, fused, optionally fp16) and folded. Each
   statistic's allreduce starts asynchronously in the hooks (``on_statistic``), overlapping
   the rest of forward/backward; after gradient accumulation they are sent at the step.
2. Each inverse is computed by its inverse worker and broadcast to the layer's gradient-worker
   group (COMM-OPT: all ranks; MEM-OPT: nobody; HYBRID: a process set). With
   ``stale_inverse`` the broadcast is asynchronous and every rank keeps using the previous
   inverse until the next step.
3. Gradient workers precondition; MEM-OPT/HYBRID then broadcast the preconditioned gradient
   from each worker to its receiver group. One host read of every layer's sum(v . g) (and the
   adaptive changes) ends the step.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd import inverse, wire
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array
from hvd_ngd.strategies.base import DistributionStrategy, EngineContext, changes_vector

_ITEMSIZE = {"float16": 2, "float32": 4}


class KAISAStrategy(DistributionStrategy):
    """COMM-OPT / MEM-OPT / HYBRID (see the module docstring).

    State owned here: factor allreduces in flight (started in the hooks) and, in stale-inverse
    mode, inverses still being broadcast.
    """

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.inflight: Dict[StatKey, Any] = {}
        self.pending: Dict[StatKey, Tuple[List[Any], bool]] = {}  # handles or tensors, remote
        self.inverted_keys = [k for n in ctx.layer_order for k in ctx.blocks[n].inverted]

    # ------------------------------------------------------------------ hook time
    def on_statistic(self, key: StatKey, value: Array) -> None:
        if self.ctx.placement.world == 1:
            return
        self.inflight[key] = self.ctx.comm.allreduce_async(
            self.ctx.codec.encode((key,), [value]), name=f"hvd_ngd.factor.{key}", average=True
        )

    def discard(self, wait: bool = False) -> None:
        if wait:
            for handle in self.inflight.values():
                self.ctx.comm.wait(handle)
        self.inflight.clear()

    # ------------------------------------------------------------------ factors
    def _update_factors(self) -> Dict[StatKey, Optional[Array]]:
        ctx = self.ctx
        ops, step = ctx.ops, ctx.state.steps
        due = ctx.schedule.due(step)
        early = {k: ctx.comm.wait(h) for k, h in self.inflight.items()}
        self.inflight.clear()
        if not due:
            return {}
        batch = {k: ctx.statistics.mean(k, step) for k in due}
        dtype = ops.dtype_name(batch[due[0]])
        if ctx.placement.world == 1:  # nothing to average
            return ctx.curvature.fold(due, [batch[k] for k in due])
        valid = {} if ctx.statistics.accumulated else early
        values: Dict[StatKey, Array] = {k: ctx.codec.decode((k,), valid[k], dtype)[0] for k in due if k in valid}
        late = [k for k in due if k not in valid]
        if late:
            item = 2 if ctx.config.wire_dtype.value == "float16" else _ITEMSIZE.get(dtype, 8)
            sizes = [n * item for n in ctx.codec.wire_sizes(late)]
            for b, idx in enumerate(wire.bucket(sizes, ctx.config.fusion_threshold_bytes)):
                keys = tuple(late[i] for i in idx)
                buf = ctx.codec.encode(keys, [batch[k] for k in keys])
                buf = ctx.comm.allreduce(buf, name=f"hvd_ngd.factors.s{step}.{b}.{ops.shape(buf)[0]}", average=True)
                values.update(zip(keys, ctx.codec.decode(keys, buf, dtype)))
        return ctx.curvature.fold(due, [values[k] for k in due])

    # ------------------------------------------------------------------ inverses
    def _install(self, key: StatKey, tensors: List[Array]) -> None:
        block = self.ctx.blocks[key.layer]
        self.ctx.state.inverses[key] = block.rebuild_inverse(self.ctx.ops, key, tensors)

    def _swap_pending(self) -> None:
        for key, (handles, remote) in list(self.pending.items()):
            self._install(key, [self.ctx.comm.wait(h) for h in handles] if remote else handles)
        self.pending.clear()

    def _update_inverses(self) -> None:
        ctx = self.ctx
        ops, comm, pl, cur, state = ctx.ops, ctx.comm, ctx.placement, ctx.curvature, ctx.state
        self._swap_pending()
        if not cur.forced_now and ctx.schedule.tracker.skip_all_inverses(state.steps, self.inverted_keys):
            return
        started: Dict[StatKey, Tuple[List[Any], bool]] = {}
        for layer in ctx.layer_order:
            block = ctx.blocks[layer]
            if not block.inverted:
                continue
            group = pl.group_arg(layer)
            members = group if group is not None else None
            for key in block.inverted:
                if key not in state.factors or not cur.inverse_due(key):
                    continue
                if members is not None and pl.rank not in members:
                    continue
                worker = pl.inverse_worker(key)
                if pl.rank == worker:
                    tensors = inverse.inverse_to_tensors(cur.compute_inverse(key))
                else:
                    tensors = block.inverse_template(ops, key, state.factors[key])
                remote = (len(members) if members is not None else pl.world) > 1
                if remote:
                    tensors = [
                        comm.broadcast_async(t, worker, name=f"hvd_ngd.inv.{key}.{i}", group=group)
                        for i, t in enumerate(tensors)
                    ]
                started[key] = (tensors, remote)
        # Stale mode keeps using the previous inverse for this step, on every rank and whatever
        # the world size (so a 1-rank run follows the same schedule); the first one is waited for.
        for key, (handles, remote) in started.items():
            if ctx.config.stale_inverse and key in state.inverses:
                self.pending[key] = (handles, remote)
                continue
            self._install(key, [comm.wait(h) for h in handles] if remote else handles)

    def pending_inverses(self) -> Dict[StatKey, List[Array]]:
        out = {}
        for key, (handles, remote) in list(self.pending.items()):
            tensors = [self.ctx.comm.wait(h) for h in handles] if remote else handles
            self.pending[key] = (tensors, False)
            out[key] = tensors
        return out

    def load_pending(self, pending: Mapping[StatKey, List[Array]]) -> None:
        self.pending = {k: (list(v), False) for k, v in pending.items()}

    # ------------------------------------------------------------------ the step
    def step(self, grads: Mapping[str, Array], other_grads: Sequence[Array]) -> Tuple[Dict[str, Array], List[Array]]:
        ctx = self.ctx
        ops, pl, cur, state = ctx.ops, ctx.placement, ctx.curvature, ctx.state
        step = state.steps
        changes = self._update_factors()
        self._update_inverses()
        local, computed, vg_names, vg_pieces = cur.precondition(pl.local_layers, grads)
        pgrads: Dict[str, Array] = dict(grads)
        pgrads.update(local)
        if pl.grad_workers < pl.world:
            received = self._broadcast_preconditioned(pgrads)
            if received:
                keep = [i for i, n in enumerate(vg_names) if n not in received]
                if vg_pieces:
                    vg = ops.concat(vg_pieces, 0) if len(vg_pieces) > 1 else vg_pieces[0]
                    vg_pieces = [ops.take(vg, ops.index(np.asarray(keep, dtype=np.int64), vg))]
                vg_names = [vg_names[i] for i in keep]
                vg_names.extend(received)
                vg_pieces.append(cur.vg_terms(received, pgrads, grads))
        seen = set(vg_names)
        rest = [n for n in ctx.layer_order if n not in seen] if len(seen) < len(ctx.layer_order) else []
        if rest:
            vg_names = vg_names + rest
            vg_pieces = vg_pieces + [cur.vg_terms(rest, pgrads, grads)]
        due = ctx.schedule.due(step)
        adaptive = ctx.schedule.adaptive and bool(due)
        if adaptive:
            vg_pieces = vg_pieces + [changes_vector(ctx, due, changes, grads[ctx.layer_order[0]])]
        read = ops.to_numpy(ops.concat(vg_pieces, 0) if len(vg_pieces) > 1 else vg_pieces[0])  # the one read
        vg_values = read[: len(vg_names)]
        if adaptive:
            cur.record_changes(step, due, [float(c) for c in read[len(vg_names) :]])
        vg_total = 0.0
        computed_set = set(computed)
        by_name = dict(zip(vg_names, vg_values))
        for name in ctx.layer_order:  # one summation order on every rank: identical KL scales
            value = float(by_name[name])
            if math.isfinite(value):
                vg_total += value
                continue
            if name in computed_set:
                cur.escalate(name)
            else:
                cur.fall_back(name, "received a non-finite preconditioned gradient")
            pgrads[name] = grads[name]
            vg_total += ops.to_float(ops.sum(grads[name] * grads[name]))  # rare path
        scale = cur.kl_scale(vg_total)
        if scale != 1.0:
            pgrads = {k: v * scale for k, v in pgrads.items()}
        return pgrads, list(other_grads)

    def _broadcast_preconditioned(self, pgrads: Dict[str, Array]) -> List[str]:
        """Send each K-FAC layer's preconditioned gradient from its worker to its receiver
        group; returns the layers this rank received."""
        ctx = self.ctx
        pl = ctx.placement
        received: List[str] = []
        if len(pl.my_receivers) <= 1:
            return received
        for layer in ctx.layer_order:
            if not ctx.blocks[layer].inverted:
                continue
            workers = set(pl.worker_group(layer))
            root = next(r for r in pl.my_receivers if r in workers)
            pgrads[layer] = ctx.comm.broadcast(pgrads[layer], root, name=f"hvd_ngd.pgrad.{layer}", group=pl.my_receivers)
            if root != pl.rank:
                received.append(layer)
        return received
