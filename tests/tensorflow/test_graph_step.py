"""Graph steps (``hvd_ngd.tensorflow.graph_step``): steps with nothing due run in the graph.

Reference: the same traced loop with ``graph_step=False`` (every step eager in a
``tf.py_function``); float64, so the two must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.tensorflow import KFAC
from hvd_ngd.tensorflow.keras_version import require_keras
from tests.tensorflow.keras.test_optimizer import make_model

keras = require_keras()
pytestmark = pytest.mark.usefixtures("float64")
N = 8


def train(graph_step: bool, steps: int, **config):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, N, 4, 4, 1))
    y = rng.integers(0, 3, size=(steps, N))
    model = make_model()
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), reduce_gradients=True, graph_step=graph_step,
                damping=0.05, kl_clip=1e-3, factor_update_interval=3, inv_update_interval=6, **config)
    opt = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = kfac.gradient(tape, loss, model.trainable_variables, lr=tf.constant(0.1, tf.float64))
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for i in range(steps):
        step(tf.constant(x[i]), tf.constant(y[i]))
    return model, kfac


def test_graph_steps_equal_eager_steps_and_skip_the_py_function() -> None:
    graph_model, graph_kfac = train(True, 14)
    eager_model, eager_kfac = train(False, 14)
    assert graph_kfac.graph is not None and graph_kfac.graph_step_reason == ""
    for a, b in zip(graph_model.trainable_variables, eager_model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert graph_kfac.steps == eager_kfac.steps == 14
    # steps 0, 3, 6, 9, 12 refresh (eager); the other 9 ran in the graph
    assert graph_kfac.graph.frozen_steps == 9
    assert graph_kfac.statistics_counts == eager_kfac.statistics_counts
    assert graph_kfac.hyperparameters == eager_kfac.hyperparameters


def test_nonfinite_gradients_in_a_graph_step_take_the_eager_skip() -> None:
    model = make_model()
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), reduce_gradients=True, damping=0.05,
                factor_update_interval=10, inv_update_interval=10)
    opt = keras.optimizers.SGD(0.1)

    @tf.function
    def step(xb, scale):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(xb, training=True)) * scale
        grads = kfac.gradient(tape, loss, model.trainable_variables, lr=tf.constant(0.1, tf.float64))
        opt.apply_gradients(zip(grads, model.trainable_variables))

    x = tf.constant(np.random.default_rng(1).normal(size=(N, 4, 4, 1)))
    for _ in range(3):
        step(x, tf.constant(1.0, tf.float64))
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        step(x, tf.constant(np.inf, tf.float64))
        assert kfac.skipped_steps == 1
    for v, b in zip(model.trainable_variables, before):
        assert np.all(np.isfinite(v.numpy()))
        np.testing.assert_array_equal(v.numpy(), b)


def test_graph_step_reason_for_unsupported_configurations() -> None:
    kfac = KFAC(make_model(), communicator=SingleProcessCommunicator(), reduce_gradients=True, inverse_method="cholesky")
    assert kfac.graph is None and "cholesky" in kfac.graph_step_reason
