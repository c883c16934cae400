"""Numerical faults: a layer with non-finite or singular curvature falls back to its plain
gradient with a warning, bad statistics are not folded, damping escalates, training recovers,
and every rank of a world stays identical."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import CurvatureWarning, Preconditioner
from hvd_ngd.testing import ThreadedWorld

OPS = NumpyOps()
SPECS = [LayerSpec("good", LayerKind.LINEAR, 3, 2, True), LayerSpec("bad", LayerKind.LINEAR, 3, 2, False)]


def feed(engine: Preconditioner, rng: np.random.Generator, poison: bool) -> dict:
    plan = engine.capture_plan()
    for spec in SPECS:
        a, g = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
        if poison and spec.name == "bad":
            a[0, 0] = np.nan
        if "A" in plan.get(spec.name, ()):
            engine.accumulate(spec.name, "A", capture.a_statistic(OPS, spec, a))
        if "G" in plan.get(spec.name, ()):
            engine.accumulate(spec.name, "G", capture.g_statistic(OPS, spec, g, 1.0))
    return {"good": rng.normal(size=(2, 4)), "bad": rng.normal(size=(2, 3))}


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "mem-opt"])
def test_nan_activations_fall_back_and_recover_on_every_rank(strategy: str) -> None:
    def body(comm):
        engine = Preconditioner(SPECS, KFACConfig(strategy=strategy, damping=0.01, kl_clip=None, factor_update_interval=1, inv_update_interval=1), OPS, comm)
        rng = np.random.default_rng(comm.rank)
        out = []
        for step in range(4):
            grads = feed(engine, rng, poison=step == 1)
            if strategy != "spngd":
                grads = {k: comm.allreduce(v, name=f"g{k}") for k, v in grads.items()}
            reduced = {k: comm.allreduce(v, name=f"r{k}") for k, v in grads.items()} if strategy == "spngd" else grads
            pgrads, _ = engine.step(grads)  # warnings are checked single-process below (not thread-safe)
            if step == 1:
                if strategy != "spngd" or engine.layer_owner("bad") == comm.rank:  # spngd: owner decides
                    assert [(s, n) for s, n, _ in engine.fallbacks] == [(1, "bad")]
                np.testing.assert_array_equal(pgrads["bad"], reduced["bad"])  # the plain (averaged) gradient
                assert not np.array_equal(pgrads["good"], reduced["good"])
            assert all(np.isfinite(v).all() for v in pgrads.values())
            out.append(pgrads)
        held = [v for k, v in engine.factors.items()]
        assert all(np.isfinite(v).all() for v in held), "a non-finite statistic was folded"
        return out

    results = ThreadedWorld(2).run(body)
    for step in range(4):
        for name in ("good", "bad"):
            assert np.array_equal(results[0][step][name], results[1][step][name])


def test_failed_decomposition_falls_back_escalates_damping_and_recovers(monkeypatch) -> None:
    engine = Preconditioner(SPECS, KFACConfig(strategy="comm-opt", damping=0.01, kl_clip=None), OPS, SingleProcessCommunicator())
    rng = np.random.default_rng(0)
    real_eigh = OPS.eigh
    calls = {"n": 0}

    def flaky_eigh(x):
        calls["n"] += 1
        if calls["n"] == 3:  # the first decomposition of layer 'bad' fails
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_eigh(x)

    monkeypatch.setattr(OPS, "eigh", flaky_eigh)
    grads = feed(engine, rng, poison=False)
    with pytest.warns(CurvatureWarning, match="'bad'"):
        pgrads, _ = engine.step(dict(grads))
    np.testing.assert_array_equal(pgrads["bad"], grads["bad"])
    assert engine.layer_damping["bad"] == pytest.approx(0.1) and engine.layer_damping["good"] == 0.01
    grads = feed(engine, rng, poison=False)
    pgrads, _ = engine.step(dict(grads))  # inverses recomputed at once: recovered
    assert not np.array_equal(pgrads["bad"], grads["bad"]) and np.isfinite(pgrads["bad"]).all()


def test_damping_escalation_is_capped() -> None:
    engine = Preconditioner(SPECS, KFACConfig(damping=0.01, max_damping=0.05), OPS, SingleProcessCommunicator())
    engine.checked(["bad"], {"bad": np.full((2, 3), np.nan)}, {"bad": np.zeros((2, 3))})
    assert engine.layer_damping["bad"] == 0.05


def test_non_finite_statistic_warns_with_layer_and_step() -> None:
    engine = Preconditioner(SPECS, KFACConfig(damping=0.01, factor_update_interval=1, inv_update_interval=1), OPS, SingleProcessCommunicator())
    rng = np.random.default_rng(1)
    engine.step(feed(engine, rng, poison=False))
    with pytest.warns(CurvatureWarning, match="layer 'bad' uses its plain gradient at step 1: non-finite statistic bad/A"):
        engine.step(feed(engine, rng, poison=True))


@pytest.mark.filterwarnings("ignore::hvd_ngd.preconditioner.CurvatureWarning")
@pytest.mark.parametrize("strategy", ["spngd", "mem-opt"])
def test_escalation_on_the_preconditioning_rank_reaches_every_rank_and_checkpoints(strategy: str) -> None:
    """Only the rank that preconditions a layer sees its decomposition fail and escalates its
    damping; the next step's consistency allgather shares it (no RankMismatchError), and a
    checkpoint taken in between keeps the escalation and the forced inverses."""

    def body(comm):
        engine = Preconditioner(SPECS, KFACConfig(strategy=strategy, damping=0.01, kl_clip=None, factor_update_interval=1, inv_update_interval=1), OPS, comm)
        rng = np.random.default_rng(comm.rank)
        for step in range(3):
            grads = feed(engine, rng, poison=False)
            if strategy != "spngd":
                grads = {k: comm.allreduce(v, name=f"g{k}") for k, v in grads.items()}
            engine.step(grads)
            if step == 0:
                decider = engine.layer_owner("bad") == comm.rank
                if decider:  # what a failed decomposition on that rank does
                    engine.checked(["bad"], {"bad": np.full((2, 3), np.nan)}, {"bad": np.zeros((2, 3))})
                local = dict(engine.layer_damping)
                state = engine.state_dict()
        return decider, local, state, dict(engine.layer_damping)

    results = ThreadedWorld(2).run(body)
    assert sorted(decider for decider, *_ in results) == [False, True]
    for decider, local, state, final in results:
        assert local["bad"] == pytest.approx(0.1 if decider else 0.01)  # escalated where it failed
        assert state["layer_damping"] == {"good": 0.01, "bad": pytest.approx(0.1)}
        assert {"bad/A", "bad/G"} <= set(state["force_inverse"])
        assert final == {"good": 0.01, "bad": pytest.approx(0.1)}  # shared at the next step's check
