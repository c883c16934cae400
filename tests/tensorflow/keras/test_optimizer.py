"""``hvd_ngd.tensorflow.keras.DistributedOptimizer`` in one process: model.fit with new and legacy
tf-keras optimizers, learning-rate schedules reaching KL clipping, ``minimize`` with a callable
loss, and clear errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402
from hvd_ngd.tensorflow.keras import DistributedOptimizer, current_learning_rate  # noqa: E402

keras = tf.keras
N = 5
CFG = dict(damping=0.05, kl_clip=1e-2, strategy="comm-opt")


pytestmark = pytest.mark.usefixtures("float64")


def make_model():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(3, 3, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Flatten(), keras.layers.Dense(3)])
    for v in model.variables:
        if v.trainable:
            v.assign(tf.cast(tf.reshape(tf.range(tf.size(v)), v.shape), v.dtype) * 0.011 - 0.05)
    return model


def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(4 * N, 4, 4, 1)), rng.integers(0, 3, size=4 * N)


def custom_loop(lrs, epochs=2):
    """Reference: the eager custom loop with K-FAC and plain SGD-momentum, given per-step rates."""
    x, y = data()
    model = make_model()
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), reduce_gradients=True, lr=lrs[0], **CFG)
    sgd = keras.optimizers.SGD(lrs[0], momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = 0
    for _ in range(epochs):
        for i in range(0, 4 * N, N):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i : i + N], model(x[i : i + N], training=True))
            grads = kfac.gradient(tape, loss, model.trainable_variables, lr=lrs[step])
            sgd.learning_rate = lrs[step]
            sgd.apply_gradients(zip(grads, model.trainable_variables))
            step += 1
    return model


@pytest.mark.parametrize("legacy", [False, True])
def test_fit_with_schedule_follows_custom_loop(legacy: bool) -> None:
    """A decaying schedule reaches the preconditioner (KL clipping uses each step's rate)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.7)
    sgd = (keras.optimizers.legacy.SGD if legacy else keras.optimizers.SGD)(schedule, momentum=0.9)
    x, y = data()
    model = make_model()
    opt = DistributedOptimizer(sgd, model, communicator=SingleProcessCommunicator(), **CFG)
    assert type(opt).__name__ == "SGD" and isinstance(opt, type(sgd))
    assert opt.kfac.config.lr == pytest.approx(0.2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    assert opt.kfac.steps == 8
    lrs = [float(np.float32(schedule(s))) for s in range(8)]
    assert opt.kfac.config.lr == pytest.approx(lrs[-1], rel=1e-6)
    reference = custom_loop(lrs)
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)


def test_learning_rate_variable_changed_by_callback() -> None:
    x, y = data()
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model, communicator=SingleProcessCommunicator(), **CFG)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))])
    assert opt.kfac.config.lr == pytest.approx(0.05)
    assert float(current_learning_rate(opt)) == pytest.approx(0.05)


def test_minimize_with_callable_loss() -> None:
    x, y = data()
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1), model, communicator=SingleProcessCommunicator(), **CFG)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = [v.numpy().copy() for v in model.trainable_variables]
    opt.minimize(lambda: loss_fn(y[:N], model(x[:N], training=True)), model.trainable_variables)
    assert opt.kfac.steps == 1
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_rejects_non_tf_keras_optimizer_and_bad_config() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="tf-keras optimizer"):
        DistributedOptimizer(object(), model, communicator=SingleProcessCommunicator())
    with pytest.raises(ValueError, match="damping"):
        DistributedOptimizer(keras.optimizers.SGD(0.1), model, communicator=SingleProcessCommunicator(), damping=-1.0)
