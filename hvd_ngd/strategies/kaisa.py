"""KAISA strategies (COMM-OPT, MEM-OPT, HYBRID) on already-averaged gradients.

1. Due factors are averaged over all ranks (fused, packed, optionally fp16) and folded.
2. Each inverse is computed by its inverse worker and broadcast to the layer's gradient-worker
   group (COMM-OPT: all ranks; MEM-OPT: nobody; HYBRID: a process set). With
   ``stale_inverse`` the broadcast is asynchronous and every rank keeps using the previous
   inverse until the next step.
3. Gradient workers precondition; MEM-OPT/HYBRID then broadcast the preconditioned gradient
   from each worker to its receiver group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping

from hvd_ngd import inverse

if TYPE_CHECKING:  # pragma: no cover
    from hvd_ngd.preconditioner import Preconditioner

from hvd_ngd.ops.base import Array


def update_factors(engine: "Preconditioner") -> None:
    """Average due statistics over ranks and fold them into the running factors."""
    due = engine.due_statistics()
    batch = [engine.batch_statistic(k) for k in due]
    early = {k: engine.comm.wait(h) for k, h in engine.inflight.items()}  # started in the hooks
    valid = {k: v for k, v in early.items() if engine.overlap}  # invalid after gradient accumulation
    late = [k for k in due if k not in valid]
    late_values = engine.allreduce_fused(
        [engine.factor_to_wire(k, engine.batch_statistic(k)) for k in late], f"factors.s{engine.steps}"
    )
    valid.update(zip(late, late_values))
    reduced = [valid[k] for k in due]
    for key, flat, like in zip(due, reduced, batch):
        change = engine.fold(key, engine.factor_from_wire(key, flat, like))
        if change is not None:
            engine.tracker.record_refresh(key, engine.steps, change)


def _swap_pending(engine: "Preconditioner") -> None:
    """Install inverses refreshed at an earlier step (stale-inverse mode)."""
    for key, (handles, diagonal, remote) in list(engine.pending.items()):
        tensors = [engine.comm.wait(h) for h in handles] if remote else handles
        engine.inverses[key] = inverse.inverse_from_tensors(engine.ops, engine.config.inverse_method, diagonal, tensors)
    engine.pending.clear()


def update_inverses(engine: "Preconditioner") -> None:
    """Recompute due inverses on their workers and distribute them to gradient workers."""
    _swap_pending(engine)
    asynchronous = engine.config.stale_inverse
    started: Dict[str, tuple] = {}
    for layer in engine.layer_order:
        spec = engine.specs[layer]
        if spec.kind.is_unitwise:
            continue
        group = engine.worker_group(layer) if engine.grad_workers < engine.world else None
        members = group if group is not None else list(range(engine.world))
        for statistic in ("A", "G"):
            key = f"{layer}/{statistic}"
            if key not in engine.factors or not engine.inverse_due(layer, statistic):
                continue
            worker = engine.inverse_worker(layer, statistic)
            if engine.rank not in members:
                continue
            diagonal = statistic == "A" and spec.a_is_diagonal
            if engine.rank == worker:
                tensors = inverse.inverse_to_tensors(engine.compute_inverse(layer, statistic))
            else:
                tensors = engine.inverse_template(layer, statistic)
            if len(members) > 1:
                handles = [
                    engine.comm.broadcast_async(t, worker, name=f"hvd_ngd.inv.{key}.{i}", group=group)
                    for i, t in enumerate(tensors)
                ]
            else:
                handles = tensors
            started[key] = (handles, diagonal, len(members) > 1)
    # Stale mode keeps using the previous inverse for this step, on every rank and whatever the
    # world size (so a 1-rank run follows the same schedule); the first inverse is waited for.
    for key, (handles, diagonal, remote) in started.items():
        if asynchronous and key in engine.inverses:
            engine.pending[key] = (handles, diagonal, remote)
            continue
        tensors = [engine.comm.wait(h) for h in handles] if remote else handles
        engine.inverses[key] = inverse.inverse_from_tensors(engine.ops, engine.config.inverse_method, diagonal, tensors)


def step(engine: "Preconditioner", grads: Mapping[str, Array]) -> Dict[str, Array]:
    """One KAISA step; returns preconditioned, KL-clipped gradients on every rank."""
    update_factors(engine)
    update_inverses(engine)
    pgrads: Dict[str, Array] = {}
    computed: List[str] = []
    for layer in engine.layer_order:
        local = engine.specs[layer].kind.is_unitwise or engine.rank in engine.worker_group(layer)
        if local and engine.has_curvature(layer) and not engine.fell_back(layer):
            pgrads[layer] = engine.precondition_layer(layer, grads[layer])
            computed.append(layer)
        else:  # plain gradient, or a placeholder that the broadcast below overwrites
            pgrads[layer] = grads[layer]
    engine.checked(computed, pgrads, grads)
    if engine.grad_workers < engine.world:
        _broadcast_preconditioned(engine, pgrads, grads)
    scale = engine.kl_scale(engine.vg_sum(engine.layer_order, pgrads, grads))
    if scale != 1.0:
        pgrads = {k: v * scale for k, v in pgrads.items()}
    return pgrads


def _broadcast_preconditioned(engine: "Preconditioner", pgrads: Dict[str, Array], grads: Mapping[str, Array]) -> None:
    """Send each K-FAC layer's preconditioned gradient from its worker to its receiver group."""
    my_receivers = next(g for g in engine.receiver_groups if engine.rank in g)
    for layer in engine.layer_order:
        if engine.specs[layer].kind.is_unitwise:
            continue
        workers = set(engine.worker_group(layer))
        root = next(r for r in my_receivers if r in workers)
        if len(my_receivers) > 1:
            pgrads[layer] = engine.comm.broadcast(
                pgrads[layer], root, name=f"hvd_ngd.pgrad.{layer}", group=my_receivers
            )
