"""The frozen step (``hvd_ngd.engine.frozen``) equals the engine's own step with nothing due.

Reference: the engine's eager ``reduce_and_step`` on the same gradients, on 1, 2 and 3 ranks of
the threaded world, for SP-NGD and comm-opt, with KL clipping binding. Its health flag must be
non-zero exactly when the engine would not take the step as computed (non-finite gradients on
one rank, ranks that disagree on a hyperparameter, a non-finite preconditioned gradient).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest

from hvd_ngd import capture
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.engine import frozen
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.testing import ThreadedWorld

LAYERS = [
    LayerSpec("emb", LayerKind.EMBEDDING, 9, 6, False),
    LayerSpec("ln", LayerKind.LAYERNORM, 6, 6, True),
    LayerSpec("fc0", LayerKind.LINEAR, 6, 5, True),
    LayerSpec("fc1", LayerKind.LINEAR, 5, 6, True),
    LayerSpec("fc2", LayerKind.LINEAR, 6, 6, False),
]
SHAPES = {"emb": (6, 9), "ln": (2, 6), "fc0": (5, 7), "fc1": (6, 6), "fc2": (6, 6)}


def feed(engine: Preconditioner, rng: np.random.Generator) -> None:
    """Give the engine the statistics due at its current step."""
    ops = engine.ops
    plan = engine.capture_plan()
    for spec in LAYERS:
        wanted = plan.get(spec.name, set())
        if spec.kind is LayerKind.EMBEDDING:
            a, g = rng.integers(0, 9, size=(4, 2)), rng.normal(size=(8, 6))
        elif spec.kind is LayerKind.LAYERNORM:
            a, g = rng.normal(size=(4, 6, 2)), rng.normal(size=(4, 6, 2))
        else:
            a, g = rng.normal(size=(4, spec.in_features)), rng.normal(size=(4, spec.out_features))
        if "A" in wanted:
            engine.accumulate(spec.name, "A", capture.a_statistic(ops, spec, a, like=np.zeros(1)))
        if "G" in wanted:
            engine.accumulate(spec.name, "G", capture.g_statistic(ops, spec, g, 4.0))
        if "F" in wanted:
            engine.accumulate(spec.name, "F", capture.f_statistic(ops, spec, a, g, 4.0))


def gradients(rng: np.random.Generator) -> Tuple[Dict[str, np.ndarray], List[np.ndarray]]:
    return {n: rng.normal(size=s) for n, s in SHAPES.items()}, [rng.normal(size=3), rng.normal(size=(2, 2))]


def check_row(engine: Preconditioner, lr: float) -> np.ndarray:
    return np.concatenate([[float(engine.steps), lr], frozen.check_values(engine)])


def run(comm, config: KFACConfig, reduce: bool, same_grads: bool, warm: int, frozen_steps: int):
    """Eager steps up to ``warm``, then compare frozen and eager steps; returns both results."""
    ops = NumpyOps()
    engine = Preconditioner(LAYERS, config, ops, comm)
    rng = np.random.default_rng(0 if same_grads else comm.rank)
    for _ in range(warm):
        feed(engine, rng)
        grads, other = gradients(rng)
        engine.reduce_and_step(grads, other, reduce_gradients=reduce)
    plan, reason = frozen.frozen_plan(engine, reduce, SHAPES)
    assert plan is not None, reason
    assert frozen.steady_steps(engine, plan, 100) >= frozen_steps
    results = []
    for _ in range(frozen_steps):
        grads, other = gradients(rng)
        lr = config.lr
        got, got_other, bad = frozen.frozen_step(
            ops, comm, plan, engine.blocks, frozen.frozen_operands(engine, plan),
            [grads[n] for n in plan.layer_order], other, np.float64(lr), np.float64(config.kl_clip), check_row(engine, lr),
        )
        want, want_other = engine.reduce_and_step(grads, other, reduce_gradients=reduce)
        results.append((got, got_other, float(bad), [want[n] for n in plan.layer_order], want_other))
    return results


def assert_equal_results(results) -> None:
    for got, got_other, bad, want, want_other in results:
        assert bad == 0.0
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
        for g, w in zip(got_other, want_other):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)


CONFIG = dict(factor_update_interval=3, inv_update_interval=6, damping=0.01, kl_clip=1e-4)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("strategy,reduce", [("spngd", True), ("comm-opt", True), ("comm-opt", False)])
def test_frozen_step_equals_the_engine_step(world: int, strategy: str, reduce: bool) -> None:
    config = KFACConfig(strategy=strategy, **CONFIG)
    same = not reduce  # KAISA without reduction gets gradients averaged already: the same on every rank
    if world == 1:
        per_rank = [run(SingleProcessCommunicator(), config, reduce, same, warm=7, frozen_steps=2)]
    else:
        per_rank = ThreadedWorld(world).run(lambda comm: run(comm, config, reduce, same, warm=7, frozen_steps=2))
    for results in per_rank:
        assert_equal_results(results)


def test_kl_clipping_binds_in_the_reference() -> None:
    """The comparison above covers the clipped branch: the eager scale is below 1 there."""
    config = KFACConfig(strategy="spngd", **CONFIG)
    engine = Preconditioner(LAYERS, config, NumpyOps(), SingleProcessCommunicator())
    rng = np.random.default_rng(0)
    for _ in range(7):
        feed(engine, rng)
        grads, other = gradients(rng)
        engine.reduce_and_step(grads, other, reduce_gradients=True)
    grads, other = gradients(rng)
    clipped, _ = engine.reduce_and_step(grads, other, reduce_gradients=True)
    unclipped = {n: engine.precondition_layer(n, grads[n]) for n in SHAPES}
    ratio = np.linalg.norm(clipped["fc1"]) / np.linalg.norm(unclipped["fc1"])
    assert ratio < 0.5


def bad_flags(world: int, poison) -> List[float]:
    config = KFACConfig(strategy="spngd", **CONFIG)

    def body(comm) -> float:
        ops = NumpyOps()
        engine = Preconditioner(LAYERS, config, ops, comm)
        rng = np.random.default_rng(comm.rank)
        for _ in range(7):
            feed(engine, rng)
            grads, other = gradients(rng)
            engine.reduce_and_step(grads, other, reduce_gradients=True)
        plan, _ = frozen.frozen_plan(engine, True, SHAPES)
        grads, other = gradients(rng)
        lr = config.lr
        operands = frozen.frozen_operands(engine, plan)
        grads, operands, lr = poison(comm.rank, grads, operands, lr)
        _, _, bad = frozen.frozen_step(
            ops, comm, plan, engine.blocks, operands, [grads[n] for n in plan.layer_order], other,
            np.float64(lr), np.float64(config.kl_clip), check_row(engine, lr),
        )
        return float(bad)

    return ThreadedWorld(world).run(body)


def test_nonfinite_gradient_on_one_rank_flags_every_rank() -> None:
    def poison(rank, grads, operands, lr):
        if rank == 1:
            grads["fc1"][0, 0] = np.nan
        return grads, operands, lr

    assert all(not (b == 0.0) for b in bad_flags(2, poison))


def test_ranks_that_disagree_on_lr_flag_every_rank() -> None:
    def poison(rank, grads, operands, lr):
        return grads, operands, lr * (2.0 if rank == 1 else 1.0)

    assert all(b != 0.0 for b in bad_flags(2, poison))


def test_nonfinite_curvature_flags_every_rank() -> None:
    def poison(rank, grads, operands, lr):
        operands = dict(operands)
        for name, value in operands.items():
            if name == "fc1":
                operands[name] = tuple(v * np.nan for v in value)
        return grads, operands, lr

    assert all(not (b == 0.0) for b in bad_flags(2, poison))


def test_healthy_step_is_not_flagged() -> None:
    assert bad_flags(2, lambda rank, g, o, lr: (g, o, lr)) == [0.0, 0.0]


def test_steady_steps_follow_the_schedule_and_failures() -> None:
    config = KFACConfig(strategy="spngd", **CONFIG)
    engine = Preconditioner(LAYERS, config, NumpyOps(), SingleProcessCommunicator())
    plan, _ = frozen.frozen_plan(engine, True, SHAPES)
    assert frozen.steady_steps(engine, plan, 100) == 0  # no curvature yet
    rng = np.random.default_rng(0)
    for _ in range(7):
        feed(engine, rng)
        grads, other = gradients(rng)
        engine.reduce_and_step(grads, other, reduce_gradients=True)
    assert frozen.steady_steps(engine, plan, 100) == 2  # steps 7 and 8; 9 refreshes factors
    assert frozen.steady_steps(engine, plan, 1) == 1
    engine.state.force_inverse.add(engine.blocks["fc0"].inverted[0])
    assert frozen.steady_steps(engine, plan, 100) == 0


def test_catch_up_counts_like_eager_steps() -> None:
    config = KFACConfig(strategy="spngd", **CONFIG)
    engines = [Preconditioner(LAYERS, config, NumpyOps(), SingleProcessCommunicator()) for _ in range(2)]
    for engine in engines:
        rng = np.random.default_rng(0)
        for _ in range(7):
            feed(engine, rng)
            grads, other = gradients(rng)
            engine.reduce_and_step(grads, other, reduce_gradients=True)
    eager, caught = engines
    rng = np.random.default_rng(1)
    for _ in range(2):
        grads, other = gradients(rng)
        eager.reduce_and_step(grads, other, reduce_gradients=True)
    frozen.catch_up(caught, 2)
    assert caught.steps == eager.steps == 9
    assert caught.tracker.counts == eager.tracker.counts
    assert caught.tracker.counts.skipped > 0


@pytest.mark.parametrize(
    "config,reason",
    [
        (dict(strategy="mem-opt"), "broadcasts preconditioned gradients"),
        (dict(strategy="comm-opt", inverse_method="cholesky"), "inverse_method='cholesky'"),
        (dict(strategy="comm-opt", stale_inverse=True), "stale_inverse"),
    ],
)
def test_unsupported_configurations_have_no_plan(config: dict, reason: str) -> None:
    def body(comm):
        engine = Preconditioner(LAYERS, KFACConfig(**config), NumpyOps(), comm)
        return frozen.frozen_plan(engine, True, SHAPES)

    for plan, why in ThreadedWorld(2).run(body):
        assert plan is None and reason in why
