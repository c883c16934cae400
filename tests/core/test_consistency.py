"""Per-step rank consistency: hyperparameters that drift apart across ranks are detected at the
next step, on every rank, with an error naming each value, before any gradient is exchanged."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import RankMismatchError, check_hyperparameters
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld

OPS = NumpyOps()
SPECS = [LayerSpec("fc1", LayerKind.LINEAR, 3, 4, True), LayerSpec("fc2", LayerKind.LINEAR, 4, 2, False)]


def feed(engine: Preconditioner, rng: np.random.Generator) -> dict:
    plan = engine.capture_plan()
    for spec in SPECS:
        a, g = rng.normal(size=(5, spec.in_features)), rng.normal(size=(5, spec.out_features))
        if "A" in plan.get(spec.name, ()):
            engine.accumulate(spec.name, "A", capture.a_statistic(OPS, spec, a))
        if "G" in plan.get(spec.name, ()):
            engine.accumulate(spec.name, "G", capture.g_statistic(OPS, spec, g, 1.0))
    return {s.name: rng.normal(size=(s.out_features, s.a_dim)) for s in SPECS}


def drift_run(strategy: str, drift_step: int, mutate: Any, extra_for: Any = None, steps: int = 4, **cfg: Any) -> List[Any]:
    """Run ``steps`` steps on 2 ranks; rank 1 calls ``mutate(engine)`` before ``drift_step``.
    Returns per rank (steps completed, error message or None, bytes sent)."""

    def body(comm):
        engine = Preconditioner(SPECS, KFACConfig(strategy=strategy, damping=0.01, **cfg), OPS, comm)
        rng = np.random.default_rng(comm.rank)
        for step in range(steps):
            if step == drift_step and comm.rank == 1:
                mutate(engine)
            grads = feed(engine, rng)
            extra = extra_for(comm.rank, step) if extra_for else None
            try:
                engine.reduce_and_step(grads, [], reduce_gradients=True, hyperparameters=extra)
            except RankMismatchError as exc:
                return step, str(exc)
        return steps, None

    return ThreadedWorld(2).run(body)


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "hybrid"])
def test_learning_rate_drift_is_reported_on_every_rank_at_the_next_step(strategy: str) -> None:
    def mutate(engine: Preconditioner) -> None:
        engine.set_hyperparameters(lr=0.05)  # e.g. an LR schedule stepped on one rank only

    cfg = {"grad_worker_fraction": 0.5} if strategy == "hybrid" else {}
    results = drift_run(strategy, 2, mutate, **cfg)
    for step, message in results:
        assert step == 2, "the drift must be caught at the step it happens, on every rank"
        assert "hyperparameters differ across ranks at step 2" in message
        assert "lr: rank 0 has 0.1, rank 1 has 0.05" in message
        assert "damping" not in message.split("lr:")[1].split(".")[0]  # only the differing value


def test_damping_and_interval_drift_are_named() -> None:
    def mutate(engine: Preconditioner) -> None:
        engine.set_hyperparameters(damping=0.02)
        engine.set_hyperparameters(inv_update_interval=3)

    (_, message0), (_, message1) = drift_run("comm-opt", 1, mutate, inv_update_interval=1)
    assert message0 == message1
    assert "damping: rank 0 has 0.01, rank 1 has 0.02" in message0
    assert "inv_update_interval: rank 0 has 1, rank 1 has 3" in message0


def test_adapter_values_are_compared_too() -> None:
    def extra(rank: int, step: int) -> dict:
        return {"group0.momentum": 0.9 if rank == 0 or step < 3 else 0.0, "group0.weight_decay": 1e-4}

    results = drift_run("spngd", -1, None, extra_for=extra)
    for step, message in results:
        assert step == 3 and "group0.momentum: rank 0 has 0.9, rank 1 has 0" in message
        assert "weight_decay" not in message


def test_a_rank_that_skipped_a_step_is_reported() -> None:
    def mutate(engine: Preconditioner) -> None:
        engine.steps += 1  # as if rank 1 had stepped once more

    (_, message), _ = drift_run("spngd", 2, mutate)
    assert "step: rank 0 has 2, rank 1 has 3" in message


def test_interval_zero_disables_and_interval_k_checks_every_k_steps() -> None:
    def mutate(engine: Preconditioner) -> None:
        engine.set_hyperparameters(kl_clip=0.5)

    assert [r[1] for r in drift_run("comm-opt", 1, mutate, consistency_check_interval=0)] == [None, None]
    results = drift_run("comm-opt", 1, mutate, steps=6, consistency_check_interval=3, kl_clip=1e-3)
    assert [r[0] for r in results] == [3, 3]  # drift at step 1, first checked step after it is 3
    assert "kl_clip: rank 0 has 0.001, rank 1 has 0.5" in results[0][1]


def test_identical_ranks_train_and_nan_values_compare_equal() -> None:
    results = drift_run("comm-opt", -1, None, extra_for=lambda rank, step: {"custom": float("nan")})
    assert results == [(4, None), (4, None)]


def test_one_rank_never_communicates_for_the_check() -> None:
    class Counting(SingleProcessCommunicator):
        gathers = 0

        def allgather(self, x, *, name):
            Counting.gathers += 1
            return x

    engine = Preconditioner(SPECS, KFACConfig(strategy="comm-opt"), OPS, Counting())
    rng = np.random.default_rng(0)
    for _ in range(3):
        engine.step(feed(engine, rng))
    assert Counting.gathers == 0


def test_check_hyperparameters_function_directly() -> None:
    def body(comm):
        values = {"a": 1.0, "b": 2.0 + comm.rank}
        try:
            check_hyperparameters(comm, OPS, values, step=7)
        except RankMismatchError as exc:
            return str(exc)
        return None

    messages = ThreadedWorld(3).run(body)
    assert len(set(messages)) == 1
    assert "at step 7: b: rank 0 has 2, rank 1 has 3, rank 2 has 4" in messages[0]
    assert " a:" not in messages[0]
