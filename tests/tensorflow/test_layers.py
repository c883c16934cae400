"""Through the recorded forward pass and the tape: captured factors and preconditioned
gradients of Keras layers equal independent numpy references (float64)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402

import keras  # noqa: E402  (Keras 3)
DAMPING = 0.05
N = 5


pytestmark = pytest.mark.usefixtures("float64")


def dense_solve(a, g, grad):
    f = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
    return np.linalg.solve(f, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def step(model, x, kfac):
    """One tape step with a mean loss; returns (z of the first layer, its output grad * N, grads, pgrads)."""
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=True)
        loss = tf.reduce_mean(tf.reduce_sum(tf.reshape(out, (N, -1)) ** 2, axis=1))
    layer = kfac.layers[0]
    x_in, z = layer.records[0].inputs, layer.records[0].output
    g = tape.gradient(loss, z).numpy() * N
    plain = tape.gradient(loss, model.trainable_variables)
    pgrads = kfac.gradient(tape, loss, model.trainable_variables)
    return x_in.numpy(), g, [tf.convert_to_tensor(p).numpy() for p in plain], [tf.convert_to_tensor(p).numpy() for p in pgrads]


ACTIVATIONS = {None: (lambda z: z, lambda z: np.ones_like(z)), "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
               "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype))}


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
def test_dense_with_activation(activation, use_bias) -> None:
    """Captured z is the pre-activation output: A, G and the preconditioned gradient equal a
    numpy forward/backward of the same layer (output gradients derived by hand)."""
    tf.random.set_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=activation, use_bias=use_bias)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 4), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    w = model.layers[0].kernel.numpy()
    b = model.layers[0].bias.numpy() if use_bias else 0.0
    z = xin @ w + b
    act, dact = ACTIVATIONS[activation]
    g_by_hand = 2 * act(z) * dact(z)  # d(sum_i mean_n y^2)/dz * N
    np.testing.assert_allclose(g, g_by_hand, rtol=1e-12, atol=1e-14)
    aug = np.concatenate([xin, np.ones((N, 1))], 1) if use_bias else xin
    a_ref, g_ref = aug.T @ aug / N, g_by_hand.T @ g_by_hand / N
    name = kfac.layers[0].name
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/A"].numpy(), a_ref, rtol=1e-12)
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/G"].numpy(), g_ref, rtol=1e-12, atol=1e-14)
    grad = np.concatenate([plain[0].T, plain[1][:, None]], 1) if use_bias else plain[0].T
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(pgrads[0], expected[:, :4].T, rtol=1e-8, atol=1e-12)
    if use_bias:
        np.testing.assert_allclose(pgrads[1], expected[:, 4], rtol=1e-8, atol=1e-12)


def test_dense_on_sequences_folds_tokens_into_batch() -> None:
    tf.random.set_seed(5)
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(2)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 3, 4), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    aug = np.concatenate([xin.reshape(-1, 4), np.ones((N * 3, 1))], 1)
    gr = g.reshape(-1, 2)
    a_ref, g_ref = aug.T @ aug / (N * 3), gr.T @ gr / (N * 3)
    grad = np.concatenate([plain[0].T, plain[1][:, None]], 1)
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(pgrads[0], expected[:, :4].T, rtol=1e-8, atol=1e-12)


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


def test_conv2d_valid_padding_strided() -> None:
    tf.random.set_seed(6)
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(2, (3, 2), strides=2, use_bias=False)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 5, 5, 2), dtype=tf.float64)
    xin, g, plain, pgrads = step(model, x, kfac)
    locs = [(i, j) for i in range(0, 3, 2) for j in range(0, 4, 2)]  # output 2 x 2
    patches = np.stack([xin[:, i : i + 3, j : j + 2, :].reshape(N, -1) for i, j in locs], 1)
    a_ref = np.einsum("nli,nlj->ij", patches, patches) / (N * len(locs))
    gl = g.reshape(N, len(locs), 2)
    g_ref = np.einsum("nli,nlj->ij", gl, gl) / N
    name = kfac.layers[0].name
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/A"].numpy(), a_ref, rtol=1e-10)
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/G"].numpy(), g_ref, rtol=1e-10)
    expected = dense_solve(a_ref, g_ref, plain[0].reshape(-1, 2).T)
    np.testing.assert_allclose(pgrads[0], expected.T.reshape(3, 2, 2, 2), rtol=1e-8, atol=1e-12)


def unitwise_reference(x_hat, gc, grad_gamma, grad_beta):
    """Per-channel 2x2 solves from explicit per-sample loops; x_hat, gc: (N, C, L)."""
    out = []
    for ch in range(x_hat.shape[1]):
        per = np.array([[np.sum(gc[i, ch] * x_hat[i, ch]), np.sum(gc[i, ch])] for i in range(x_hat.shape[0])])
        f = per.T @ per / x_hat.shape[0]
        out.append(np.linalg.solve(f + DAMPING * np.eye(2), [grad_gamma[ch], grad_beta[ch]]))
    return np.array(out)


def test_batchnorm_unitwise_on_feature_maps() -> None:
    tf.random.set_seed(7)
    norm = keras.layers.BatchNormalization(gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5),
                                           beta_initializer=keras.initializers.RandomUniform(-0.5, 0.5))
    model = keras.Sequential([keras.Input((3, 2, 4)), norm])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, factor_decay=0.0, kl_clip=None)
    x = tf.random.normal((N, 3, 2, 4), dtype=tf.float64) * 2 + 1
    xin, g, plain, pgrads = step(model, x, kfac)
    mean, var = xin.mean((0, 1, 2)), xin.var((0, 1, 2))  # training: batch statistics
    x_hat = ((xin - mean) / np.sqrt(var + norm.epsilon)).reshape(N, -1, 4).transpose(0, 2, 1)
    gc = g.reshape(N, -1, 4).transpose(0, 2, 1)
    expected = unitwise_reference(x_hat, gc, plain[0], plain[1])
    np.testing.assert_allclose(np.stack([pgrads[0], pgrads[1]], 1), expected, rtol=1e-7)


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
    expected = unitwise_reference(x_hat, g.transpose(0, 2, 1), plain[0], plain[1])
    np.testing.assert_allclose(np.stack([pgrads[0], pgrads[1]], 1), expected, rtol=1e-7)


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
        assert kfac.steps == 4
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
    assert kfac.steps == 1 and all(np.isfinite(g.numpy()).all() for g in grads)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.constant(0.0, tf.float64) * x)
    with pytest.raises(RuntimeError, match="no forward pass"):
        kfac.gradient(tape, loss, model.trainable_variables)


def test_keras_fit_equals_custom_loop() -> None:
    """model.fit with the K-FAC optimizer follows the eager custom loop step for step."""
    from hvd_ngd.tensorflow.keras import DistributedOptimizer

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4 * N, 4)), rng.integers(0, 3, size=4 * N)

    def make():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"),
                                  keras.layers.LayerNormalization(), keras.layers.Dense(3)])
        for v in model.variables:
            v.assign(tf.cast(tf.reshape(tf.range(tf.size(v)), v.shape), v.dtype) * 0.013 - 0.07)
        return model

    cfg = dict(damping=DAMPING, kl_clip=1e-2, lr=0.1, strategy="comm-opt")
    fitted = make()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), fitted, communicator=SingleProcessCommunicator(), **cfg)
    fitted.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fitted.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    assert opt.kfac.steps == 8

    looped = make()
    kfac = KFAC(looped, communicator=SingleProcessCommunicator(), reduce_gradients=True, **cfg)
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(2):
        for i in range(0, 4 * N, N):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i : i + N], looped(x[i : i + N], training=True))
            sgd.apply_gradients(zip(kfac.gradient(tape, loss, looped.trainable_variables), looped.trainable_variables))
    for a, b in zip(fitted.trainable_variables, looped.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)


def test_registration_nested_names_skips_and_unsupported_axes() -> None:
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="dense")], name="inner")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="dense"), inner,
                              keras.layers.Reshape((2, 2)), keras.layers.LayerNormalization(axis=1, name="ln_axis1"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="head")], name="outer")
    with pytest.warns(UserWarning, match="ln_axis1"):
        kfac = KFAC(model, communicator=SingleProcessCommunicator(), skip_layers=["head"])
    assert [layer.name for layer in kfac.layers] == ["dense", "inner/dense"]
    assert set(kfac.skipped) == {"ln_axis1", "head"}
    x = tf.random.normal((N, 4), dtype=tf.float64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x) ** 2)
    grads = kfac.gradient(tape, loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) and kfac.steps == 1
    assert not any(layer.layer.supports_jit for layer in kfac.layers)  # Keras 3 must not XLA-compile the step
    kfac.remove_hooks()
    model(x)
    assert all(not layer.records for layer in kfac.layers)
    assert all(layer.layer.supports_jit for layer in kfac.layers)


def test_unbuilt_model_and_spngd_without_reduction_are_rejected() -> None:
    with pytest.raises(ValueError, match="not built"):
        KFAC(keras.Sequential([keras.layers.Dense(2)]), communicator=SingleProcessCommunicator())
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="reduce_gradients=True"):
        KFAC(model, communicator=SingleProcessCommunicator(), strategy="spngd")


def test_kl_clip_uses_the_given_learning_rate() -> None:
    """``gradient(..., lr=...)`` sets the rate KL clipping uses, eagerly and inside tf.function."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, kl_clip=1e-3, lr=0.1)
    lr = tf.Variable(0.5, dtype=tf.float64)

    @tf.function
    def traced(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) ** 2)
        return kfac.gradient(tape, loss, model.trainable_variables, lr=lr)

    traced(tf.ones((N, 3), tf.float64))
    assert kfac.hyperparameters["lr"] == 0.5
    lr.assign(0.25)
    traced(tf.ones((N, 3), tf.float64))
    assert kfac.hyperparameters["lr"] == 0.25
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.ones((N, 3), tf.float64)) ** 2)
    kfac.gradient(tape, loss, model.trainable_variables, lr=0.125)
    assert kfac.hyperparameters["lr"] == 0.125


def test_eager_calls_outside_a_tape_are_not_recorded() -> None:
    """Eager inference (no tape recording) keeps nothing alive; calls inside a tape are recorded."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu")])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING)
    x = tf.random.normal((N, 3), dtype=tf.float64)
    for _ in range(3):
        model(x)
    assert not kfac.layers[0].records
    with tf.GradientTape():
        model(x)
    assert len(kfac.layers[0].records) == 1


def test_unsupported_keras3_layers_are_skipped_with_a_reason_and_keep_plain_gradients() -> None:
    """EinsumDense, MultiHeadAttention's projections and a LoRA Dense are reported with the reason
    and keep their plain gradients; Dense layers inside a custom block are found and registered."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(4, activation="tanh", name="inner")

        def call(self, x):
            return x + self.inner(x)

    tokens = keras.Input((3, 4))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(3, 4), name="einsum")(tokens)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, name="mha")(h, h)
    h = Block(name="block")(h)
    lora = keras.layers.Dense(4, name="lora")
    h = lora(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(tokens, out)
    lora.enable_lora(2)
    with pytest.warns(UserWarning) as caught:
        kfac = KFAC(model, communicator=SingleProcessCommunicator(), damping=DAMPING, kl_clip=None)
    messages = " ".join(str(w.message) for w in caught)
    assert [layer.name for layer in kfac.layers] == ["block/inner", "head"]
    assert "EinsumDense" in kfac.skipped["einsum"] and "plain averaged gradients" in kfac.skipped["einsum"]
    assert {"mha/query", "mha/key", "mha/value", "mha/attention_output"} <= set(kfac.skipped)
    assert "LoRA" in kfac.skipped["lora"]
    assert "'einsum' (EinsumDense)" in messages and "'mha/query' (EinsumDense)" in messages
    x = tf.random.normal((N, 3, 4), dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_mean(model(x, training=True) ** 2)
    plain = tape.gradient(loss, model.trainable_variables)
    pgrads = kfac.gradient(tape, loss, model.trainable_variables)
    registered = {id(v) for layer in kfac.layers for v in layer.variables()}
    for v, g, p in zip(model.trainable_variables, plain, pgrads):
        if id(v) in registered:
            assert not np.allclose(tf.convert_to_tensor(g).numpy(), p.numpy()), v.path
        else:  # EinsumDense, attention, LoRA factors: the plain gradient, bitwise
            np.testing.assert_array_equal(tf.convert_to_tensor(g).numpy(), p.numpy())


def test_keras_version_and_backend_are_checked(monkeypatch) -> None:
    from hvd_ngd.tensorflow import keras_version

    monkeypatch.setattr(keras, "__version__", "2.15.0")
    with pytest.raises(ImportError, match="needs Keras 3.*found keras 2.15.0"):
        keras_version.require_keras()
    monkeypatch.undo()
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ImportError, match="KERAS_BACKEND=tensorflow"):
        keras_version.require_keras()
