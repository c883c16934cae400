"""``hvd_ngd.tensorflow.keras.DistributedOptimizer`` in one process (Keras 3): model.fit follows the
custom loop, learning-rate schedules reach KL clipping, ``apply_gradients`` in a custom loop, XLA
is turned off, and clear errors for optimizers and models it does not support."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402
from hvd_ngd.tensorflow.keras import DistributedOptimizer, current_learning_rate  # noqa: E402

import keras  # noqa: E402  (Keras 3)
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


def test_fit_with_schedule_follows_custom_loop() -> None:
    """A decaying schedule reaches the preconditioner (KL clipping uses each step's rate)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.7)
    sgd = keras.optimizers.SGD(schedule, momentum=0.9)
    x, y = data()
    model = make_model()
    opt = DistributedOptimizer(sgd, model, communicator=SingleProcessCommunicator(), **CFG)
    assert type(opt).__name__ == "SGD" and isinstance(opt, type(sgd))
    assert opt.kfac.hyperparameters["lr"] == pytest.approx(0.2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    assert opt.kfac.steps == 8 and not model.jit_compile
    lrs = [float(np.float32(schedule(s))) for s in range(8)]
    assert opt.kfac.hyperparameters["lr"] == pytest.approx(lrs[-1], rel=1e-6)
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
    assert opt.kfac.hyperparameters["lr"] == pytest.approx(0.05)
    assert float(current_learning_rate(opt)) == pytest.approx(0.05)


def test_apply_gradients_in_a_custom_loop_preconditions() -> None:
    """The wrapped optimizer preconditions whatever reaches ``apply_gradients`` after a tape step,
    eagerly and in tf.function, and equals ``KFAC.gradient`` + the plain optimizer."""
    x, y = data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def run(compiled: bool):
        model = make_model()
        opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model, communicator=SingleProcessCommunicator(),
                                   **CFG)

        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        fn = tf.function(train_step) if compiled else train_step
        for i in range(0, 4 * N, N):
            fn(tf.constant(x[i : i + N]), tf.constant(y[i : i + N]))
        assert opt.kfac.steps == 4
        return model

    eager, traced = run(False), run(True)
    reference = custom_loop([0.1] * 4, epochs=1)
    for a, b, c in zip(eager.trainable_variables, traced.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), c.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.numpy(), c.numpy(), rtol=1e-9, atol=1e-12)


def test_jit_compile_is_turned_off_with_a_warning() -> None:
    """Keras 3 would XLA-compile the step; registered layers opt out, so even jit_compile=True
    falls back to a plain tf.function (Keras warns) instead of failing on Horovod's ops."""
    x, y = data()
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1), model, communicator=SingleProcessCommunicator(), **CFG)
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    assert model.jit_compile is False and opt.kfac.steps == 4


def test_rejects_unsupported_optimizers_models_and_bad_config() -> None:
    model = make_model()
    comm = SingleProcessCommunicator()
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        DistributedOptimizer(object(), model, communicator=comm)
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        DistributedOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), model, communicator=comm)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        DistributedOptimizer(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), model, communicator=comm)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        DistributedOptimizer(keras.optimizers.SGD(0.1, loss_scale_factor=128.0), model, communicator=comm)
    with pytest.raises(ValueError, match="damping"):
        DistributedOptimizer(keras.optimizers.SGD(0.1), model, communicator=comm, damping=-1.0)


def test_rejects_tf_keras_optimizers_and_models() -> None:
    """tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``) objects are refused with the fix."""
    tf_keras = pytest.importorskip("tf_keras")
    model = make_model()
    comm = SingleProcessCommunicator()
    with pytest.raises(TypeError, match=r"tf-keras \(Keras 2\) optimizer SGD.*TF_USE_LEGACY_KERAS"):
        DistributedOptimizer(tf_keras.optimizers.SGD(0.1), model, communicator=comm)
    legacy_model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"tf-keras \(Keras 2\) model"):
        KFAC(legacy_model, communicator=comm)
    with pytest.raises(TypeError, match=r"tf-keras \(Keras 2\) model"):
        DistributedOptimizer(keras.optimizers.SGD(0.1), legacy_model, communicator=comm)
