"""Graph steps on 2 ranks: the frozen step's Horovod graph collectives inside ``model.fit``.

Reference: the same run with ``graph_step=False`` (every step eager in a ``tf.py_function``) on
the same ranks. The 1-rank equivalence of ``model.fit`` (graph steps on, the default) is in
``test_equivalence.py``.
"""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.tensorflow import KFAC
from tests.tensorflow.distributed.test_equivalence import LOCAL, data, fit, make_model

import keras  # noqa: E402  (Keras 3)

CFG = dict(damping=0.01, factor_decay=0.8, kl_clip=0.05, factor_update_interval=3, inv_update_interval=6)


def gathered(params: np.ndarray, tag: str) -> np.ndarray:
    return hvd.allgather(tf.constant(params[None]), name=f"tf.graph_step.{tag}").numpy()


def flat(model) -> np.ndarray:
    return np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])


def fit_local(strategy: str, graph_step: bool):
    from hvd_ngd.tensorflow.keras import DistributedOptimizer

    batches = data()
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    x = np.concatenate([b[0][lo:hi] for b in batches])
    y = np.concatenate([b[1][lo:hi] for b in batches])
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model, strategy=strategy,
                               graph_step=graph_step, **CFG)
    fit(model, opt, x, y, LOCAL)
    return model, opt.kfac


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_model_fit_graph_steps_equal_eager_steps_on_2_ranks(strategy: str) -> None:
    graph_model, graph_kfac = fit_local(strategy, True)
    eager_model, eager_kfac = fit_local(strategy, False)
    assert graph_kfac.graph is not None and graph_kfac.graph_step_reason == ""
    assert eager_kfac.graph is None
    # 2 epochs of 5 steps; steps 0, 3, 6, 9 refresh (eager), the other 6 ran in the graph
    assert graph_kfac.steps == eager_kfac.steps == 10
    assert graph_kfac.graph.frozen_steps == 6
    assert graph_kfac.statistics_counts == eager_kfac.statistics_counts
    params = flat(graph_model)
    every = gathered(params, f"fit.{strategy}")
    for r in range(hvd.size()):
        assert np.array_equal(every[r], every[0]), f"rank {r} differs from rank 0"
    np.testing.assert_allclose(params, flat(eager_model), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_nonfinite_gradients_on_one_rank_in_a_graph_step_skip_on_every_rank(strategy: str) -> None:
    """Rank 1's gradients are infinite in a step with nothing due: the in-graph health check
    (an allgather) sends every rank to the eager path, which skips the step on every rank."""
    model = make_model()
    kfac = KFAC(model, strategy=strategy, reduce_gradients=True, lr=0.1, **CFG)
    opt = keras.optimizers.SGD(0.1)

    @tf.function
    def step(xb, yb, scale):
        with tf.GradientTape() as tape:
            logits = model(xb)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)) * scale
        grads = kfac.gradient(tape, loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    batches = data()
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    one = tf.constant(1.0, tf.float64)
    for x, y in batches[:2]:  # step 0 refreshes, step 1 is a graph step
        step(tf.constant(x[lo:hi]), tf.constant(y[lo:hi]), one)
    assert kfac.graph is not None and kfac.steps == 2
    before = flat(model)
    bad = tf.constant(np.inf if hvd.rank() == 1 else 1.0, tf.float64)
    x, y = batches[2]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(tf.constant(x[lo:hi]), tf.constant(y[lo:hi]), bad)  # step 2: nothing due
    assert kfac.skipped_steps == 1
    params = flat(model)
    assert np.all(np.isfinite(params))
    np.testing.assert_array_equal(params, before)
    every = gathered(params, f"nan.{strategy}")
    for r in range(hvd.size()):
        assert np.array_equal(every[r], every[0]), f"rank {r} differs from rank 0"
    assert kfac.graph.frozen_steps == 1  # step 1 ran in the graph; step 2 fell back to the eager step
