"""Through the recorded forward pass and the tape: captured factors and preconditioned
gradients of Keras layers equal independent numpy references (float64)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402

keras = tf.keras
DAMPING = 0.05
N = 5


@pytest.fixture(autouse=True)
def float64():
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx("float32")


def dense_solve(a, g, grad):
    f = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
    return np.linalg.solve(f, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def step(model, x, kfac):
    """One tape step with a mean loss; returns (z of the first layer, its output grad * N, grads, pgrads)."""
    with tf.GradientTape(persistent=True) as tape:
        out = model(x)
        loss = tf.reduce_mean(tf.reduce_sum(tf.reshape(out, (N, -1)) ** 2, axis=1))
    layer = kfac.layers[0]
    x_in, z = layer.records[0]
    g = tape.gradient(loss, z).numpy() * N
    plain = tape.gradient(loss, model.trainable_variables)
    pgrads = kfac.gradient(tape, loss, model.trainable_variables)
    return x_in.numpy(), g, [tf.convert_to_tensor(p).numpy() for p in plain], [tf.convert_to_tensor(p).numpy() for p in pgrads]


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_dense_with_activation(activation) -> None:
    tf.random.set_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=activation)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 4), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    aug = np.concatenate([xin, np.ones((N, 1))], 1)
    a_ref, g_ref = aug.T @ aug / N, g.T @ g / N
    np.testing.assert_allclose(kfac.engine.factors[f"{kfac.layers[0].name}/A"].numpy(), a_ref, rtol=1e-12)
    np.testing.assert_allclose(kfac.engine.factors[f"{kfac.layers[0].name}/G"].numpy(), g_ref, rtol=1e-12)
    grad = np.concatenate([plain[0].T, plain[1][:, None]], 1)
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(pgrads[0], expected[:, :4].T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(pgrads[1], expected[:, 4], rtol=1e-8, atol=1e-12)


def test_conv2d_same_padding() -> None:
    tf.random.set_seed(1)
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3, padding="same", activation="relu")])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 4, 4, 2), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    xp = np.pad(xin, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([xp[:, i : i + 3, j : j + 3, :].reshape(N, -1) for i in range(4) for j in range(4)], 1)
    aug = np.concatenate([patches, np.ones((N, 16, 1))], 2)
    a_ref = np.einsum("nli,nlj->ij", aug, aug) / (N * 16)
    gl = g.reshape(N, 16, 3)
    g_ref = np.einsum("nli,nlj->ij", gl, gl) / N
    name = kfac.layers[0].name
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/A"].numpy(), a_ref, rtol=1e-10)
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/G"].numpy(), g_ref, rtol=1e-10)
    grad = np.concatenate([plain[0].reshape(-1, 3).T, plain[1][:, None]], 1)
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(pgrads[0], expected[:, :18].T.reshape(3, 3, 2, 3), rtol=1e-8, atol=1e-12)


def test_layernorm_unitwise() -> None:
    tf.random.set_seed(2)
    norm = keras.layers.LayerNormalization(gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5),
                                           beta_initializer=keras.initializers.RandomUniform(-0.5, 0.5))
    model = keras.Sequential([keras.Input((3, 4)), norm])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 3, 4), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    mean, var = xin.mean(-1, keepdims=True), xin.var(-1, keepdims=True)
    x_hat = ((xin - mean) / np.sqrt(var + norm.epsilon)).transpose(0, 2, 1)
    gc = g.transpose(0, 2, 1)
    for ch in range(4):
        per = np.array([[np.sum(gc[i, ch] * x_hat[i, ch]), np.sum(gc[i, ch])] for i in range(N)])
        f = per.T @ per / N
        expected = np.linalg.solve(f + DAMPING * np.eye(2), [plain[0][ch], plain[1][ch]])
        np.testing.assert_allclose([pgrads[0][ch], pgrads[1][ch]], expected, rtol=1e-6)


def test_embedding_diagonal_a() -> None:
    tf.random.set_seed(3)
    model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(6, 3)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    ids = tf.constant([[0, 1], [1, 5], [5, 5], [2, 0], [4, 1]])
    xin, g, plain, pgrads = step(model, ids, kfac)
    counts = np.bincount(xin.reshape(-1), minlength=6) / xin.size
    gr = g.reshape(-1, 3)
    g_ref = gr.T @ gr / gr.shape[0]
    expected = dense_solve(np.diag(counts), g_ref, np.asarray(tf.convert_to_tensor(plain[0])).T)
    np.testing.assert_allclose(pgrads[0], expected.T, rtol=1e-8, atol=1e-12)


def test_tf_function_matches_eager() -> None:
    """Inside tf.function the K-FAC step runs through tf.py_function and gives the eager result,
    including steps where stale statistics are skipped."""

    def run(compiled: bool):
        tf.random.set_seed(4)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                                  keras.layers.LayerNormalization(), keras.layers.Dense(2)])
        for v in model.variables:  # identical initial weights in both runs
            v.assign(tf.cast(tf.reshape(tf.range(tf.size(v)), v.shape), v.dtype) * 0.01 - 0.05)
        kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_update_interval=2)
        opt = keras.optimizers.SGD(0.1)

        def train_step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.reduce_sum(model(x) ** 2, axis=1))
            grads = kfac.gradient(tape, loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        step_fn = tf.function(train_step) if compiled else train_step
        rng = np.random.default_rng(0)
        for _ in range(4):
            step_fn(tf.constant(rng.normal(size=(N, 4))))
        assert kfac.engine.steps == 4
        return [v.numpy() for v in model.trainable_variables]

    for a, b in zip(run(False), run(True)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_inference_calls_between_steps_are_ignored() -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING)
    x = tf.random.normal((N, 3), dtype=tf.float64)
    model(x)  # an evaluation call outside the tape
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    grads = kfac.gradient(tape, loss, model.trainable_variables)
    assert kfac.engine.steps == 1 and all(np.isfinite(g.numpy()).all() for g in grads)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.constant(0.0, tf.float64) * x)
    with pytest.raises(RuntimeError, match="no forward pass"):
        kfac.gradient(tape, loss, model.trainable_variables)
