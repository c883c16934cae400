"""KFACConfig validation: every field rejects a bad value naming itself; enums from strings."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hvd_ngd.config import KFACConfig, resolve_interval
from hvd_ngd.enums import (
    AssignmentCost,
    FisherType,
    IntervalPolicy,
    InverseMethod,
    LossReduction,
    Strategy,
    WireDtype,
)

# One or more bad values for every field of KFACConfig (the first test checks the coverage).
BAD = {
    "lr": [0.0, -1.0, math.nan, math.inf, "0.1", True],
    "damping": [0.0, -1e-3, math.nan, None],
    "damping_rule": ["adaptive", "RELATIVE", 1, None],
    "factor_decay": [1.0, -0.1, math.nan],
    "kl_clip": [0.0, -1.0, math.inf],
    "factor_update_interval": [0, -3, 1.5, True, "10"],
    "inv_update_interval": [0, 2.0, None],
    "interval_policy": ["sometimes", 3],
    "adaptive_threshold": [0.0, -0.1, math.nan],
    "adaptive_min_interval": [0, 1.5, True],
    "adaptive_max_interval": [0, 2.5],
    "adaptive_growth": [1.0, 0.5, math.inf],
    "inverse_method": ["svd"],
    "pi_correction": [1, "yes", None],
    "fisher_type": ["true", "mc"],  # "mc" without a loss_family
    "loss_family": ["hinge", "mse"],  # "mse" with the default fisher_type='empirical'
    "loss_reduction": ["none"],
    "strategy": ["allreduce", "comm_opt"],
    "grad_worker_fraction": [0.0, 1.5, -0.5, math.nan],
    "assignment_cost": ["time"],
    "symmetric_packing": [0, "true"],
    "wire_dtype": ["fp16", "float64", "bfloat16"],
    "stale_inverse": [1, None],
    "skip_nonfinite_steps": [1, None],
    "factor_splitting": [1, "yes"],
    "min_factor_block": [0, 1.5, True],
    "max_factor_blocks": [0, None],
    "factor_blocks": [{"fc1/X": 2}, {"fc1/A": 0}, ["fc1/A"]],
    "skip_layers": [(1, 2), ["conv", None]],
    "fusion_threshold_bytes": [-1, 1.5, None],
    "max_damping": [1e-4, math.nan],  # below the default damping 1e-3
    "consistency_check_interval": [-1, 1.5, True, None],
}
CASES = [(name, value) for name, values in BAD.items() for value in values]


def test_bad_values_cover_every_field() -> None:
    assert set(BAD) == {f.name for f in dataclasses.fields(KFACConfig)}


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_bad_value_is_rejected_naming_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        KFACConfig(**{name: value})


def test_cross_field_constraints_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="adaptive_max_interval"):
        KFACConfig(adaptive_min_interval=8, adaptive_max_interval=4)
    with pytest.raises(ValueError, match="max_damping"):
        KFACConfig(damping=0.5, max_damping=0.1)
    with pytest.raises(ValueError, match=r"factor_update_interval\(3\)"):
        resolve_interval("factor_update_interval", lambda step: 0, 3)


def test_defaults_construct() -> None:
    cfg = KFACConfig()
    assert cfg.interval_policy is IntervalPolicy.FIXED and cfg.strategy is Strategy.COMM_OPT
    assert cfg.wire_dtype is WireDtype.FLOAT32 and cfg.skip_layers == ()
    assert cfg.describe()["strategy"] == "comm-opt"
    assert KFACConfig(kl_clip=None, factor_decay=0.0, fusion_threshold_bytes=0).kl_clip is None


def test_enums_coerce_from_strings() -> None:
    cfg = KFACConfig(
        interval_policy="adaptive",
        inverse_method="cholesky",
        fisher_type="empirical",
        loss_reduction="sum",
        strategy="hybrid",
        assignment_cost="memory",
        wire_dtype="float16",
    )
    assert cfg.interval_policy is IntervalPolicy.ADAPTIVE
    assert cfg.inverse_method is InverseMethod.CHOLESKY
    assert cfg.fisher_type is FisherType.EMPIRICAL
    assert cfg.loss_reduction is LossReduction.SUM
    assert cfg.strategy is Strategy.HYBRID
    assert cfg.assignment_cost is AssignmentCost.MEMORY
    assert cfg.wire_dtype is WireDtype.FLOAT16


def test_intervals_and_skip_layers_forms() -> None:
    cfg = KFACConfig(factor_update_interval=lambda s: 1 if s < 10 else 5, skip_layers="embed.*")
    assert cfg.skip_layers == ("embed.*",)
    assert resolve_interval("factor_update_interval", cfg.factor_update_interval, 3) == 1
    assert resolve_interval("factor_update_interval", cfg.factor_update_interval, 30) == 5


@pytest.mark.parametrize("strategy,fraction,world,expected", [
    ("comm-opt", 1.0, 8, 8),
    ("mem-opt", 1.0, 8, 1),
    ("hybrid", 0.5, 4, 2),
    ("hybrid", 0.25, 8, 2),
    ("hybrid", 1.0, 3, 3),
])
def test_grad_workers(strategy: str, fraction: float, world: int, expected: int) -> None:
    assert KFACConfig(strategy=strategy, grad_worker_fraction=fraction).grad_workers(world) == expected


@pytest.mark.parametrize("fraction,world", [(0.3, 4), (0.5, 3), (0.75, 4)])
def test_grad_workers_rejects_fractions_that_do_not_divide(fraction: float, world: int) -> None:
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        KFACConfig(strategy="hybrid", grad_worker_fraction=fraction).grad_workers(world)
