"""``Preconditioner.set_hyperparameters``: schedules of damping, decay, KL clip and intervals."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.preconditioner import Preconditioner
from tests.core.test_preconditioner import LOCAL, OPS, SPECS, make_data


def run(config: KFACConfig, change_at: Optional[int] = None, **change: float) -> List[Dict[str, np.ndarray]]:
    """Preconditioned gradients of every step on one rank; ``change`` applied before ``change_at``."""
    engine = Preconditioner(SPECS, config, OPS, SingleProcessCommunicator())
    like, out = np.zeros(1), []
    for step, (d, grads, other) in enumerate(make_data(1)):
        if step == change_at:
            engine.set_hyperparameters(**change)
        plan = engine.capture_plan()
        for spec in SPECS:
            a, g = d[spec.name]
            g = g / LOCAL
            wanted = plan.get(spec.name, set())
            if "A" in wanted:
                engine.accumulate(spec.name, "A", capture.a_statistic(OPS, spec, a, like=like))
            if "G" in wanted:
                engine.accumulate(spec.name, "G", capture.g_statistic(OPS, spec, g, float(LOCAL)))
            if "F" in wanted:
                engine.accumulate(spec.name, "F", capture.f_statistic(OPS, spec, a, g, float(LOCAL)))
        pgrads, _ = engine.step({k: v.mean(axis=0) for k, v in grads.items()}, [other.mean(axis=0)])
        out.append({k: np.array(v) for k, v in pgrads.items()})
    return out


def assert_steps_equal(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> None:
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_damping_schedule_with_eigen_takes_effect_at_the_next_step() -> None:
    base = dict(damping=0.01, kl_clip=None, inverse_method="eigen", inv_update_interval=100)
    scheduled = run(KFACConfig(**base), change_at=3, damping=0.5)
    reference = run(KFACConfig(**dict(base, damping=0.5)))
    unchanged = run(KFACConfig(**base))
    for step in (3, 4):
        assert_steps_equal(scheduled[step], reference[step])
    assert not np.allclose(scheduled[3]["fc1"], unchanged[3]["fc1"])
    assert_steps_equal(scheduled[2], unchanged[2])


def test_damping_schedule_with_cholesky_recomputes_inverses() -> None:
    """Cholesky inverses hold the damping: the scheduled step recomputes them from the current
    factors, as a run with that damping and inverses at every step does at that step."""
    base = dict(damping=0.01, kl_clip=None, inverse_method="cholesky", factor_update_interval=1, inv_update_interval=100)
    scheduled = run(KFACConfig(**base), change_at=3, damping=0.5)
    every_step = run(KFACConfig(**dict(base, damping=0.5, inv_update_interval=1)))
    assert_steps_equal(scheduled[3], every_step[3])
    assert not np.allclose(scheduled[4]["fc1"], every_step[4]["fc1"])  # stale again afterwards


def test_escalated_layers_keep_their_factor_capped_by_max_damping() -> None:
    engine = Preconditioner(SPECS, KFACConfig(damping=0.01, max_damping=0.5), OPS, SingleProcessCommunicator())
    engine.layer_damping["fc1"] = 0.1  # escalated once after a failure
    engine.set_hyperparameters(damping=0.02)
    assert engine.layer_damping["fc1"] == pytest.approx(0.2)
    assert engine.layer_damping["fc2"] == pytest.approx(0.02)
    engine.set_hyperparameters(damping=0.1)
    assert engine.layer_damping["fc1"] == 0.5 and engine.layer_damping["fc2"] == pytest.approx(0.1)
    assert engine.schedule.values.damping == 0.1 and engine.hyperparameters()["damping"] == 0.1
    assert not engine.force_inverse  # eigen applies damping at preconditioning time


def test_intervals_decay_lr_and_kl_clip_are_applied_and_reported() -> None:
    engine = Preconditioner(SPECS, KFACConfig(kl_clip=1e-3), OPS, SingleProcessCommunicator())
    engine.set_hyperparameters(lr=0.5, factor_decay=0.5, kl_clip=None, factor_update_interval=3, inv_update_interval=6)
    values = engine.hyperparameters()
    assert values["lr"] == 0.5 and values["factor_decay"] == 0.5 and values["kl_clip"] == -1.0
    assert values["factor_update_interval"] == 3.0 and values["inv_update_interval"] == 6.0
    assert engine.tracker.due(1) == [] and engine.tracker.due(3) == engine.stat_names


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(damping=-1.0), "damping"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(inv_update_interval=0), "inv_update_interval"),
        (dict(damping=5.0), "max_damping"),  # above the escalation cap
        (dict(strategy="mem-opt"), "strategy"),
    ],
)
def test_invalid_or_unschedulable_values_are_named(change: dict, named: str) -> None:
    engine = Preconditioner(SPECS, KFACConfig(), OPS, SingleProcessCommunicator())
    before = engine.hyperparameters()
    with pytest.raises(ValueError, match=named):
        engine.set_hyperparameters(**change)
    assert engine.hyperparameters() == before


def test_scheduled_values_travel_with_the_state_dict() -> None:
    engine = Preconditioner(SPECS, KFACConfig(damping=0.01), OPS, SingleProcessCommunicator())
    engine.set_hyperparameters(lr=0.3, damping=0.05, kl_clip=None, inv_update_interval=7)
    state = engine.state_dict()
    assert state["hyperparameters"]["damping"] == 0.05 and state["hyperparameters"]["kl_clip"] is None
    resumed = Preconditioner(SPECS, KFACConfig(damping=0.01), OPS, SingleProcessCommunicator())
    resumed.load_state_dict(state, like=None)
    assert resumed.hyperparameters() == engine.hyperparameters()
    assert resumed.layer_damping == engine.layer_damping
