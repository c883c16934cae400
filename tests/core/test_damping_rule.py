"""DampingRule.RELATIVE: lambda = damping * mean eigenvalue of each block, checked against dense
references, for scale invariance, through the engine on every strategy (ranks agree with one
process on all the data) and through state_dict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hvd_ngd import damping as dmp
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import DampingRule, InverseMethod
from hvd_ngd.inverse import invert_factor, precondition_kronecker
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld
from hvd_ngd.unitwise import unitwise_precondition
from tests.core.test_preconditioner import LOCAL, SPECS, STEPS, run

OPS = NumpyOps()
RNG = np.random.default_rng(7)


def spd(n: int, scale: float = 1.0) -> np.ndarray:
    m = RNG.normal(size=(n, n + 2))
    return scale * (m @ m.T) / (n + 2)


def dense_natural_gradient(a: np.ndarray, g: np.ndarray, grad: np.ndarray, lam: float) -> np.ndarray:
    """(A (x) G + lam I)^-1 vec(grad), with vec stacking columns (grad is (g_dim, a_dim))."""
    fisher = np.kron(a, g) + lam * np.eye(a.shape[0] * g.shape[0])
    return np.linalg.solve(fisher, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def precondition(a, g, grad, base: float, rule: DampingRule, method: InverseMethod, diagonal: bool = False):
    """What the engine does for one Kronecker layer: invert, pick lambda by the rule, precondition."""
    if method is InverseMethod.CHOLESKY:
        da, dg = dmp.cholesky_damping(OPS, a, g, base, use_pi=True, a_is_diagonal=diagonal, rule=rule)
        a_inv = invert_factor(OPS, a, method, da, diagonal=diagonal)
        g_inv = invert_factor(OPS, g, method, dg)
    else:
        a_inv = invert_factor(OPS, a, method, diagonal=diagonal)
        g_inv = invert_factor(OPS, g, method)
    lam = dmp.kronecker_damping(OPS, a_inv.eigvals, g_inv.eigvals, base, rule)
    return precondition_kronecker(OPS, grad, a_inv, g_inv, lam)


def test_relative_kronecker_lambda_is_damping_times_mean_eigenvalue() -> None:
    a, g, grad = spd(5), spd(3, scale=40.0), RNG.normal(size=(3, 5))
    base = 0.05
    lam = base * (np.trace(a) / 5) * (np.trace(g) / 3)
    out = precondition(a, g, grad, base, DampingRule.RELATIVE, InverseMethod.EIGEN)
    np.testing.assert_allclose(out, dense_natural_gradient(a, g, grad, lam), rtol=1e-9)
    assert math.isclose(float(dmp.kronecker_damping(OPS, np.linalg.eigvalsh(a), np.linalg.eigvalsh(g), base, DampingRule.RELATIVE)), lam)
    # ABSOLUTE is the configured number itself.
    out_abs = precondition(a, g, grad, base, DampingRule.ABSOLUTE, InverseMethod.EIGEN)
    np.testing.assert_allclose(out_abs, dense_natural_gradient(a, g, grad, base), rtol=1e-9)


def test_relative_cholesky_split_damps_each_factor_by_its_own_scale() -> None:
    a, g = spd(4, scale=1e3), spd(6, scale=1e-4)
    da, dg = dmp.cholesky_damping(OPS, a, g, 0.01, use_pi=True, rule=DampingRule.RELATIVE)
    assert math.isclose(da, 0.1 * np.trace(a) / 4) and math.isclose(dg, 0.1 * np.trace(g) / 6)
    da, dg = dmp.cholesky_damping(OPS, a, g, 0.01, use_pi=False, rule=DampingRule.RELATIVE)
    lam = 0.01 * (np.trace(a) / 4) * (np.trace(g) / 6)
    assert math.isclose(da, math.sqrt(lam)) and math.isclose(dg, math.sqrt(lam))
    diag = np.array([1.0, 3.0, 8.0])  # a diagonal A (Embedding): its mean eigenvalue is its mean
    da, _ = dmp.cholesky_damping(OPS, diag, g, 0.04, use_pi=True, a_is_diagonal=True, rule=DampingRule.RELATIVE)
    assert math.isclose(da, 0.2 * 4.0)


@pytest.mark.parametrize("method", list(InverseMethod))
def test_relative_rule_is_invariant_to_factor_scale(method: InverseMethod) -> None:
    """Scaling A by c and G by d scales the Fisher by cd: under RELATIVE the natural gradient
    scales by exactly 1/(cd) (the step in the rescaled problem is the same); under ABSOLUTE not."""
    a, g, grad = spd(5), spd(4), RNG.normal(size=(4, 5))
    c, d = 1e4, 1e-3
    for rule, invariant in ((DampingRule.RELATIVE, True), (DampingRule.ABSOLUTE, False)):
        ref = precondition(a, g, grad, 0.01, rule, method)
        scaled = precondition(c * a, d * g, grad, 0.01, rule, method) * (c * d)
        assert np.allclose(scaled, ref, rtol=1e-8) is invariant, f"{rule} {method}"


def test_relative_unitwise_lambda_is_mean_eigenvalue_of_the_2x2_blocks() -> None:
    blocks = []
    for _ in range(3):
        m = spd(2, scale=RNG.uniform(0.1, 10.0))
        blocks.append([m[0, 0], m[0, 1], m[1, 1]])
    fisher = np.array(blocks)
    gg, gb = RNG.normal(size=3), RNG.normal(size=3)
    lam = float(dmp.unitwise_damping(OPS, fisher, 0.1, DampingRule.RELATIVE))
    assert math.isclose(lam, 0.1 * np.mean(fisher[:, 0] + fisher[:, 2]) / 2)
    pg, pb = unitwise_precondition(OPS, fisher, gg, gb, lam)
    for c in range(3):
        block = np.array([[fisher[c, 0], fisher[c, 1]], [fisher[c, 1], fisher[c, 2]]]) + lam * np.eye(2)
        np.testing.assert_allclose([pg[c], pb[c]], np.linalg.solve(block, [gg[c], gb[c]]), rtol=1e-10)
    assert dmp.unitwise_damping(OPS, fisher, 0.1, DampingRule.ABSOLUTE) == 0.1


def test_dead_layer_stays_finite_under_relative_damping() -> None:
    """Zero factors (a layer whose inputs are all zero) floor the scale instead of dividing by 0."""
    zero_a, g, grad = np.zeros((3, 3)), spd(2), np.zeros((2, 3))
    for method in InverseMethod:
        out = precondition(zero_a, g, grad, 1e-3, DampingRule.RELATIVE, method)
        assert np.all(np.isfinite(out)) and np.all(out == 0.0)
    assert dmp.relative_scale(0.0, 5.0) == dmp.SCALE_FLOOR
    assert dmp.relative_scale(math.inf, 5.0) == dmp.SCALE_FLOOR


def test_config_validates_damping_rule() -> None:
    assert KFACConfig(damping_rule="relative").damping_rule is DampingRule.RELATIVE
    with pytest.raises(ValueError, match="damping_rule"):
        KFACConfig(damping_rule="adaptive")


RELATIVE_CONFIGS = [
    dict(strategy="spngd"),
    dict(strategy="comm-opt"),
    dict(strategy="comm-opt", inverse_method="cholesky"),
    dict(strategy="mem-opt"),
    dict(strategy="comm-opt", stale_inverse=True, inv_update_interval=2),
]


@pytest.mark.parametrize("cfg", RELATIVE_CONFIGS, ids=[str(sorted(c.items())) for c in RELATIVE_CONFIGS])
def test_relative_damping_is_distributed_consistent(cfg: dict) -> None:
    """Two ranks on halves of the data = one process on all of it, identically on both ranks, and
    the result differs from ABSOLUTE damping (the rule is in effect)."""
    world = 2
    config = dict(damping=0.05, damping_rule="relative", factor_decay=0.7, kl_clip=0.1, lr=0.1, **cfg)
    ref_cfg = dict(config, strategy="comm-opt") if cfg["strategy"] == "mem-opt" else dict(config)
    reference, _ = run(SingleProcessCommunicator(), KFACConfig(**ref_cfg), world, 0, world * LOCAL)
    absolute, _ = run(SingleProcessCommunicator(), KFACConfig(**dict(ref_cfg, damping_rule="absolute")), world, 0, world * LOCAL)
    results = ThreadedWorld(world).run(
        lambda comm: run(comm, KFACConfig(**config), world, comm.rank * LOCAL, (comm.rank + 1) * LOCAL)[0]
    )
    for step in range(STEPS):
        for rank in range(world):
            for name, value in reference[step][0].items():
                np.testing.assert_allclose(results[rank][step][0][name], value, rtol=1e-9, atol=1e-12, err_msg=f"{name} step {step}")
                assert np.array_equal(results[rank][step][0][name], results[0][step][0][name])
    assert any(not np.allclose(reference[-1][0][n], absolute[-1][0][n]) for n in reference[-1][0])


def test_engine_relative_matches_dense_reference_per_layer() -> None:
    """After the run, each Kronecker layer's output equals the dense solve with
    lambda = damping * mean eig(A) * mean eig(G) of the engine's own running factors."""
    config = KFACConfig(damping=0.03, damping_rule="relative", kl_clip=None, strategy="comm-opt")
    _, engine = run(SingleProcessCommunicator(), config, 1, 0, LOCAL)
    grad = RNG.normal(size=(4, 6))  # fc1: out 4, in 5 + bias
    a, g = engine.factors["fc1/A"], engine.factors["fc1/G"]
    lam = 0.03 * (np.trace(a) / 6) * (np.trace(g) / 4)
    np.testing.assert_allclose(engine.precondition_layer("fc1", grad), dense_natural_gradient(a, g, grad, lam), rtol=1e-8)


def test_state_dict_carries_the_rule_and_rejects_a_mismatch() -> None:
    config = KFACConfig(damping=0.03, damping_rule="relative", strategy="comm-opt")
    _, engine = run(SingleProcessCommunicator(), config, 1, 0, LOCAL)
    state = engine.state_dict()
    assert state["damping_rule"] == "relative"
    same = Preconditioner(SPECS, KFACConfig(damping=0.03, damping_rule="relative", strategy="comm-opt"), OPS, SingleProcessCommunicator())
    same.load_state_dict(state, like=np.zeros(1))
    grad = RNG.normal(size=(4, 6))
    np.testing.assert_array_equal(same.precondition_layer("fc1", grad), engine.precondition_layer("fc1", grad))
    other = Preconditioner(SPECS, KFACConfig(damping=0.03, damping_rule="absolute", strategy="comm-opt"), OPS, SingleProcessCommunicator())
    with pytest.raises(ValueError, match="damping_rule='relative'"):
        other.load_state_dict(state, like=np.zeros(1))
