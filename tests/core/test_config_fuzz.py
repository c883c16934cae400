"""Property-based tests over the configuration space: every invalid value raises a ValueError
naming its parameter; every valid configuration runs preconditioning steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner

OPS = NumpyOps()
SPECS = [LayerSpec("fc", LayerKind.LINEAR, 3, 2, True), LayerSpec("ln", LayerKind.LAYERNORM, 2, 2, True)]

VALID = {
    "lr": st.floats(1e-4, 10.0),
    "damping": st.floats(1e-6, 1.0),
    "damping_rule": st.sampled_from(["absolute", "relative"]),
    "factor_decay": st.floats(0.0, 0.999),
    "kl_clip": st.one_of(st.none(), st.floats(1e-6, 1.0)),
    "factor_update_interval": st.integers(1, 5),
    "inv_update_interval": st.integers(1, 5),
    "interval_policy": st.sampled_from(["fixed", "adaptive"]),
    "adaptive_threshold": st.floats(1e-4, 1.0),
    "adaptive_growth": st.floats(1.1, 4.0),
    "inverse_method": st.sampled_from(["eigen", "cholesky"]),
    "pi_correction": st.booleans(),
    "strategy": st.sampled_from(["spngd", "comm-opt", "mem-opt", "hybrid"]),
    "symmetric_packing": st.booleans(),
    "wire_dtype": st.sampled_from(["float32", "float16"]),
    "fusion_threshold_bytes": st.integers(0, 1 << 20),
    "consistency_check_interval": st.integers(0, 5),
}

INVALID = {
    "lr": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.just("0.1")),
    "damping": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(None)),
    "factor_decay": st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.just(math.nan)),
    "kl_clip": st.one_of(st.floats(max_value=0.0), st.just(math.inf)),
    "factor_update_interval": st.one_of(st.integers(max_value=0), st.just(1.5), st.just(True)),
    "inv_update_interval": st.one_of(st.integers(max_value=0), st.just("10")),
    "interval_policy": st.text(min_size=1).filter(lambda s: s not in ("fixed", "adaptive")),
    "damping_rule": st.text(min_size=1).filter(lambda s: s not in ("absolute", "relative")),
    "adaptive_threshold": st.floats(max_value=0.0),
    "adaptive_min_interval": st.integers(max_value=0),
    "adaptive_growth": st.floats(max_value=1.0),
    "inverse_method": st.text(min_size=1).filter(lambda s: s not in ("eigen", "cholesky")),
    "strategy": st.text(min_size=1).filter(lambda s: s not in ("spngd", "comm-opt", "mem-opt", "hybrid")),
    "grad_worker_fraction": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001, max_value=1e9)),
    "pi_correction": st.sampled_from([0, 1, "yes", None]),
    "wire_dtype": st.sampled_from(["fp16", "float64", "int8"]),
    "fusion_threshold_bytes": st.integers(max_value=-1),
    "consistency_check_interval": st.one_of(st.integers(max_value=-1), st.just(2.0)),
}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_invalid_value_names_its_parameter(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(INVALID)))
    value = data.draw(INVALID[name])
    with pytest.raises(ValueError, match=name):
        KFACConfig(**{name: value})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.fixed_dictionaries({}, optional=VALID))
def test_every_valid_config_trains(config: dict) -> None:
    cfg = KFACConfig(**config)
    engine = Preconditioner(SPECS, cfg, OPS, SingleProcessCommunicator())
    rng = np.random.default_rng(0)
    for _ in range(3):
        plan = engine.capture_plan()
        a, g = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
        xh, gl = rng.normal(size=(6, 2, 1)), rng.normal(size=(6, 2, 1))
        if "A" in plan.get("fc", ()):
            engine.accumulate("fc", "A", capture.a_statistic(OPS, SPECS[0], a))
        if "G" in plan.get("fc", ()):
            engine.accumulate("fc", "G", capture.g_statistic(OPS, SPECS[0], g, 6.0))
        if "F" in plan.get("ln", ()):
            engine.accumulate("ln", "F", capture.f_statistic(OPS, SPECS[1], xh, gl, 6.0))
        grads = {"fc": rng.normal(size=(2, 4)), "ln": rng.normal(size=(2, 2))}
        pgrads, _ = engine.step(grads)
        assert set(pgrads) == {"fc", "ln"}
        assert all(np.isfinite(v).all() and v.shape == grads[k].shape for k, v in pgrads.items())
