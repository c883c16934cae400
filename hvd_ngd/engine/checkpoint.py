"""Checkpoints of the engine: gather every rank's part into one state that loads on any
world size (``Preconditioner.state_dict`` / ``load_state_dict``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvd_ngd.engine.state import merge_states
from hvd_ngd.enums import Strategy
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array

if TYPE_CHECKING:  # pragma: no cover
    from hvd_ngd.engine.preconditioner import Preconditioner


def save(engine: "Preconditioner") -> dict:
    """The complete state (a collective); see ``Preconditioner.state_dict``."""
    pending = engine.strategy.pending_inverses()
    local = engine.state.local_state(engine.ops)
    everyone = engine.comm.allgather_object(local, name="hvd_ngd.state_dict") if engine.world > 1 else [local]
    merged = merge_states(everyone, engine.layer_order)
    return {
        "steps": engine.state.steps,
        "method": engine.config.inverse_method.value,
        "damping_rule": engine.config.damping_rule.value,
        "hyperparameters": engine.schedule.saved(),
        "layer_damping": merged["layer_damping"],
        "force_inverse": merged["force_inverse"],
        "tracker": engine.schedule.tracker.state_dict(),
        "factors": merged["factors"],
        "inverses": merged["inverses"],
        "pending": {str(k): [engine.ops.to_numpy(t) for t in v] for k, v in pending.items()},
    }


def holds(engine: "Preconditioner", key: StatKey) -> bool:
    """Whether this rank keeps a statistic (SP-NGD: owners only; KAISA: everyone)."""
    if engine.config.strategy is not Strategy.SPNGD:
        return True
    return engine.placement.layer_owner(key.layer) == engine.rank


def load(engine: "Preconditioner", state: dict, like: Array) -> None:
    """Restore ``save`` output; see ``Preconditioner.load_state_dict``."""
    if state["method"] != engine.config.inverse_method.value:
        raise ValueError(
            f"checkpoint inverses were computed with inverse_method={state['method']!r}, "
            f"this preconditioner uses {engine.config.inverse_method.value!r}"
        )
    saved_rule = state.get("damping_rule", "absolute")
    if saved_rule != engine.config.damping_rule.value:
        raise ValueError(
            f"checkpoint was saved with damping_rule={saved_rule!r}, this preconditioner uses "
            f"{engine.config.damping_rule.value!r}: its per-layer damping would mean something else"
        )
    known = {str(k) for k in engine.stat_keys}
    unknown = sorted(set(state["factors"]) - known)
    if unknown:
        raise ValueError(f"checkpoint holds statistics of layers this model does not register: {unknown}")
    ops = engine.ops
    engine.schedule.load(state.get("hyperparameters", {}))
    engine.schedule.forget_step()
    engine.state.steps = int(state["steps"])
    engine._checked_step = -1
    engine.layer_damping = {k: float(v) for k, v in state["layer_damping"].items()}
    engine.state.force_inverse = {StatKey.parse(k) for k in state["force_inverse"]}
    engine.schedule.tracker.load_state_dict(state["tracker"])
    factors = {StatKey.parse(k): v for k, v in state["factors"].items()}
    engine.state.factors.clear()
    engine.state.factors.update({k: ops.from_numpy(v, like=like) for k, v in factors.items() if holds(engine, k)})

    def rebuild(key: StatKey, tensors: list) -> Any:
        return engine.blocks[key.layer].rebuild_inverse(ops, key, [ops.from_numpy(t, like=like) for t in tensors])

    inverses = {StatKey.parse(k): v for k, v in state["inverses"].items()}
    engine.state.inverses.clear()
    engine.state.inverses.update({k: rebuild(k, v) for k, v in inverses.items() if holds(engine, k)})
    engine.curvature.batched.clear()
    engine.strategy.load_pending(
        {StatKey.parse(k): [ops.from_numpy(t, like=like) for t in v] for k, v in state["pending"].items()}
    )
