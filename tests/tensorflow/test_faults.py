"""Faults and bad input in one process (TensorFlow adapter): a layer with non-finite or
singular curvature keeps training on its plain gradient with a ``CurvatureWarning`` naming layer
and step, bad statistics are not folded, damping escalates; misuse fails with a clear error; a
``state_dict`` round trip loses nothing (the next steps are bitwise identical)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import copy  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.keys import StatKey  # noqa: E402
from hvd_ngd.preconditioner import CurvatureWarning  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402

import keras  # noqa: E402  (Keras 3)
N, STEPS = 8, 5
# Distinct factor sides (fc1: A 5x5, G 6x6; fc2: A 7x7, G 3x3) so a fault can target one factor.
IN, HIDDEN, CLASSES = 4, 6, 3


pytestmark = pytest.mark.usefixtures("float64")


def make_model() -> keras.Model:
    """The same weights every time (drawn from numpy, not Keras' initializers)."""
    model = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(HIDDEN, activation="tanh", name="fc1"),
                              keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(CLASSES, name="fc2")])
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape))
    return model


def make_kfac(model: keras.Model, **cfg) -> KFAC:
    base = dict(strategy="comm-opt", damping=0.01, kl_clip=None, factor_decay=0.9, factor_update_interval=1, inv_update_interval=1)
    base.update(cfg)
    return KFAC(model, communicator=SingleProcessCommunicator(), reduce_gradients=True, **base)


def batches(n: int = STEPS):
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(N, IN)), rng.integers(0, CLASSES, size=N)) for _ in range(n)]


def loss_of(model, x, y):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True), from_logits=True))


def layer_of(kfac: KFAC, name: str):
    return next(layer for layer in kfac.layers if layer.name == name)


def step(model, kfac, opt, x, y, before_gradient=None):
    """One eager step; returns ({var name: plain grad}, {var name: preconditioned grad})."""
    with tf.GradientTape(persistent=True) as tape:
        loss = loss_of(model, x, y)
    plain = tape.gradient(loss, model.trainable_variables)
    if before_gradient is not None:
        before_gradient()
    pgrads = kfac.gradient(tape, loss, model.trainable_variables)
    opt.apply_gradients(zip(pgrads, model.trainable_variables))
    names = ["/".join(v.path.split("/")[-2:]) for v in model.trainable_variables]  # fc1/kernel
    return dict(zip(names, [g.numpy() for g in plain])), dict(zip(names, [np.asarray(g) for g in pgrads]))


def fc2_vars(grads: dict) -> list:
    return [k for k in grads if k.startswith("fc2/")]


def poison_activations(kfac: KFAC, name: str, value: float):
    """Put ``value`` into the recorded layer input the A statistic is computed from."""
    layer = layer_of(kfac, name)

    def inject():
        rec = layer.records[-1]
        rec.inputs = tf.tensor_scatter_nd_update(rec.inputs, [[0, 0]], tf.constant([value], rec.inputs.dtype))

    return inject


# ---------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
@pytest.mark.parametrize("where,value", [("A", np.nan), ("A", np.inf), ("G", np.nan)])
def test_non_finite_statistic_falls_back_warns_and_keeps_training(strategy, where, value, monkeypatch) -> None:
    """A NaN/Inf in fc2's activations (A) or output gradients (G) at step 1: fc2 gets its plain
    gradient, fc1 is still preconditioned, the warning names fc2 and step 1, the bad batch is
    not folded into fc2's running factor, and training continues finite (fc2 preconditioned again)."""
    model = make_model()
    kfac = make_kfac(model, strategy=strategy)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    data = batches()
    step(model, kfac, opt, *data[0])
    before = {k: v.numpy().copy() for k, v in kfac.engine.factors.items()}

    inject = None
    if where == "A":
        inject = poison_activations(kfac, "fc2", value)
    else:
        layer = layer_of(kfac, "fc2")
        real = layer.g_output
        monkeypatch.setattr(layer, "g_output", lambda g: tf.tensor_scatter_nd_update(real(g), [[0, 0]], tf.constant([value], g.dtype)))
    with pytest.warns(CurvatureWarning, match=rf"layer 'fc2' uses its plain gradient at step 1: non-finite statistic fc2/{where}"):
        plain, pgrads = step(model, kfac, opt, *data[1], before_gradient=inject)
    monkeypatch.undo()
    for k in fc2_vars(plain):
        np.testing.assert_array_equal(pgrads[k], plain[k])  # the plain gradient, bitwise
    assert not np.allclose(pgrads["fc1/kernel"], plain["fc1/kernel"]), "fc1 should still be preconditioned"
    assert [(s, n) for s, n, _ in kfac.engine.fallbacks] == [(1, "fc2")]
    np.testing.assert_array_equal(kfac.engine.factors[f"fc2/{where}"].numpy(), before[f"fc2/{where}"])  # not folded
    assert not np.array_equal(kfac.engine.factors["fc1/A"].numpy(), before["fc1/A"])  # others were
    for x, y in data[2:]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CurvatureWarning)
            plain, pgrads = step(model, kfac, opt, x, y)
        assert all(np.isfinite(g).all() for g in pgrads.values())
        assert not np.allclose(pgrads["fc2/kernel"], plain["fc2/kernel"]), "fc2 did not recover"
    assert all(np.isfinite(v.numpy()).all() for v in kfac.engine.factors.values())
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_non_finite_statistic_inside_tf_function() -> None:
    """The same fault inside a compiled step (the K-FAC step runs in a tf.py_function)."""
    model = make_model()
    kfac = make_kfac(model)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    poison = tf.Variable(0.0, dtype=tf.float64)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(model, x, y)
        layer = layer_of(kfac, "fc2")
        rec = layer.records[-1]
        rec.inputs = rec.inputs + poison  # NaN in fc2's activations when poison is NaN
        grads = kfac.gradient(tape, loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    data = batches()
    train_step(*map(tf.constant, data[0]))
    poison.assign(np.nan)
    with pytest.warns(CurvatureWarning, match="layer 'fc2' uses its plain gradient at step 1"):
        train_step(*map(tf.constant, data[1]))
    poison.assign(0.0)
    for x, y in data[2:]:
        train_step(tf.constant(x), tf.constant(y))
    assert kfac.steps == STEPS and [(s, n) for s, n, _ in kfac.engine.fallbacks] == [(1, "fc2")]
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


# ---------------------------------------------------------------------------------------------- decompositions
def test_failed_eigendecomposition_falls_back_escalates_damping_and_recovers(monkeypatch) -> None:
    """eigh of fc2's A raises at step 1: plain gradient for fc2, damping 0.01 -> 0.1 for fc2
    only, and its inverses are recomputed at step 2 although inv_update_interval=3."""
    model = make_model()
    kfac = make_kfac(model, inv_update_interval=3)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    data = batches()
    step(model, kfac, opt, *data[0])
    real = kfac.ops.eigh
    calls = []

    def eigh(x):
        calls.append((kfac.steps, tuple(x.shape)))
        if kfac.steps == 1 and tuple(x.shape) == (HIDDEN + 1, HIDDEN + 1):
            raise tf.errors.InvalidArgumentError(None, None, "Eigen decomposition was not successful")
        return real(x)

    monkeypatch.setattr(kfac.ops, "eigh", eigh)
    kfac.engine.force_inverse.update({StatKey.parse("fc2/A")})  # decompose at step 1 (not scheduled: interval 3)
    with pytest.warns(CurvatureWarning) as record:
        plain, pgrads = step(model, kfac, opt, *data[1])
    messages = [str(w.message) for w in record]
    assert any("inverting fc2/A failed at step 1" in m for m in messages), messages
    assert any("layer 'fc2' uses its plain gradient at step 1" in m and "damping 0.01 -> 0.1" in m for m in messages)
    for k in fc2_vars(plain):
        np.testing.assert_array_equal(pgrads[k], plain[k])
    assert kfac.engine.layer_damping == {"fc1": 0.01, "ln": 0.01, "fc2": pytest.approx(0.1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        plain, pgrads = step(model, kfac, opt, *data[2])
    assert (2, (HIDDEN + 1, HIDDEN + 1)) in calls and (2, (CLASSES, CLASSES)) in calls, "inverses not recomputed"
    assert (2, (IN + 1, IN + 1)) not in calls, "fc1's inverses are not due at step 2"
    assert np.isfinite(pgrads["fc2/kernel"]).all() and not np.allclose(pgrads["fc2/kernel"], plain["fc2/kernel"])


def test_cholesky_of_a_non_positive_definite_factor_falls_back_and_escalates_damping() -> None:
    """A running factor that is not positive definite makes TensorFlow's Cholesky fail: fc2
    keeps its plain gradient, its damping escalates (x10 per failure, capped by max_damping),
    and training continues finite."""
    model = make_model()
    kfac = make_kfac(model, inverse_method="cholesky", pi_correction=False, max_damping=0.5)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    data = batches()
    step(model, kfac, opt, *data[0])
    kfac.engine.factors["fc2/A"] = -5.0 * tf.eye(HIDDEN + 1, dtype=tf.float64)  # finite, negative definite
    dampings = []
    for i, (x, y) in enumerate(data[1:3], start=1):
        with pytest.warns(CurvatureWarning) as record:
            plain, pgrads = step(model, kfac, opt, x, y)
        messages = [str(w.message) for w in record]
        assert any(f"inverting fc2/A failed at step {i}" in m for m in messages), messages
        assert any(f"layer 'fc2' uses its plain gradient at step {i}" in m for m in messages), messages
        for k in fc2_vars(plain):
            np.testing.assert_array_equal(pgrads[k], plain[k])
        assert not np.allclose(pgrads["fc1/kernel"], plain["fc1/kernel"])
        dampings.append(kfac.engine.layer_damping["fc2"])
    assert dampings == [pytest.approx(0.1), pytest.approx(0.5)]
    assert kfac.engine.layer_damping["fc1"] == 0.01
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


# ---------------------------------------------------------------------------------------------- misuse
def test_gradient_without_a_recorded_forward_pass() -> None:
    model = make_model()
    kfac = make_kfac(model)
    x, y = batches(1)[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model.trainable_variables[0])
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        kfac.gradient(tape, loss, model.trainable_variables)
    model(x)  # an inference call outside any tape is not a training forward pass
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model.trainable_variables[0])
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        kfac.gradient(tape, loss, model.trainable_variables)
    assert kfac.steps == 0


def test_gradient_twice_for_one_forward_pass() -> None:
    model = make_model()
    kfac = make_kfac(model)
    x, y = batches(1)[0]
    with tf.GradientTape(persistent=True) as tape:
        loss = loss_of(model, x, y)
    kfac.gradient(tape, loss, model.trainable_variables)
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        kfac.gradient(tape, loss, model.trainable_variables)
    assert kfac.steps == 1


def two_heads() -> keras.Model:
    inp = keras.Input((IN,))
    h = keras.layers.Dense(HIDDEN, name="trunk")(inp)
    return keras.Model(inp, [keras.layers.Dense(2, name="used")(h), keras.layers.Dense(2, name="unused")(h)])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_registered_layer_that_does_not_contribute_is_named(compiled: bool) -> None:
    model = two_heads()
    kfac = make_kfac(model)
    x = tf.constant(batches(1)[0][0])

    def run():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True)[0] ** 2)  # the 'unused' head is not in the loss
        return kfac.gradient(tape, loss, model.trainable_variables)

    with pytest.raises(RuntimeError, match=r"\['unused'\] did not contribute to the loss at step 0.*skip_layers"):
        tf.function(run)() if compiled else run()
    assert kfac.steps == 0
    kfac.remove_hooks()
    kfac = make_kfac(model, skip_layers=["^unused$"])
    grads = run()
    assert kfac.steps == 1 and not np.any(grads[-1].numpy()) and np.isfinite(grads[0].numpy()).all()


def test_unbuilt_model_and_no_supported_layer() -> None:
    with pytest.raises(ValueError, match="is not built"):
        make_kfac(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="no supported layer"):
        make_kfac(keras.Sequential([keras.Input((3,)), keras.layers.Activation("relu")]))


def test_bad_configuration_names_the_parameter() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="damping"):
        make_kfac(model, damping=-1.0)
    with pytest.raises(ValueError, match="strategy"):
        make_kfac(model, strategy="bogus")
    with pytest.raises(ValueError, match="factor_decay"):
        make_kfac(model, factor_decay=1.5)
    with pytest.raises(TypeError):
        make_kfac(model, dampng=0.1)
    with pytest.raises(ValueError, match="reduce_gradients=True"):
        KFAC(model, communicator=SingleProcessCommunicator(), strategy="spngd")


def test_adasum_tape_is_rejected() -> None:
    hvd = pytest.importorskip("horovod.tensorflow")
    model = make_model()
    kfac = make_kfac(model, strategy="comm-opt")
    kfac.reduce_gradients = False  # as with a Horovod tape
    x, y = batches(1)[0]
    with tf.GradientTape() as tape:
        loss = loss_of(model, x, y)
    with pytest.raises(ValueError, match=r"does not support hvd.DistributedGradientTape\(op=hvd.Adasum\).*not an average"):
        kfac.gradient(hvd.DistributedGradientTape(tape, op=hvd.Adasum), loss, model.trainable_variables)
    assert kfac.steps == 0
    from hvd_ngd.tensorflow.preconditioner import _tape_reduce_op

    with tf.GradientTape() as tape:  # the op is read from the tape, not guessed
        loss = loss_of(model, x, y)
    assert _tape_reduce_op(hvd.DistributedGradientTape(tape)) == hvd.Average != hvd.Adasum
    assert _tape_reduce_op(tape) is None


def test_optimizer_hyperparameters_of_keras_optimizers() -> None:
    """What ``optimizer_hyperparameters`` hands to the per-step check (the learning rate goes as lr)."""
    from hvd_ngd.tensorflow.preconditioner import optimizer_hyperparameters

    assert optimizer_hyperparameters(keras.optimizers.SGD(0.1, momentum=0.9)) == {"ema_momentum": 0.99, "momentum": 0.9}
    adam = optimizer_hyperparameters(keras.optimizers.Adam(1e-3, clipnorm=1.0))
    assert adam == {"beta_1": 0.9, "beta_2": 0.999, "clipnorm": 1.0, "ema_momentum": 0.99, "epsilon": 1e-7}
    model = make_model()
    sgd = keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5), momentum=0.9)
    sgd.apply_gradients(zip([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables))
    assert optimizer_hyperparameters(sgd) == {"ema_momentum": 0.99, "momentum": 0.9}  # built, with a schedule


# ---------------------------------------------------------------------------------------------- state
def optimizer_variables(opt) -> list:
    return list(opt.variables() if callable(opt.variables) else opt.variables)


def train(model, kfac, opt, data) -> None:
    for x, y in data:
        step(model, kfac, opt, x, y)


@pytest.mark.parametrize(
    "cfg",
    [dict(factor_update_interval=2, inv_update_interval=3),
     dict(interval_policy="adaptive"),
     dict(strategy="spngd", inverse_method="cholesky"),
     dict(strategy="comm-opt", stale_inverse=True, inv_update_interval=2),
     dict(fault=True, inv_update_interval=3)],
    ids=["intervals", "adaptive", "spngd-cholesky", "stale-inverse", "after-a-fault"],
)
def test_state_dict_round_trip_gives_bitwise_identical_next_steps(cfg: dict) -> None:
    """Save model weights, optimizer slots and kfac.state_dict() after 4 steps; a fresh model,
    optimizer and KFAC restored from them take the same 4 next steps bitwise. 'after-a-fault'
    saves right after a failed decomposition (escalated damping, inverses due next step)."""
    cfg = dict(cfg)
    fault = cfg.pop("fault", False)
    data = batches(8)
    model = make_model()
    kfac = make_kfac(model, **cfg)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    train(model, kfac, opt, data[:3])
    if fault:
        real = kfac.ops.eigh

        def fail(x):
            raise tf.errors.InvalidArgumentError(None, None, "no convergence")

        kfac.ops.eigh = fail
        with pytest.warns(CurvatureWarning):
            train(model, kfac, opt, data[3:4])
        kfac.ops.eigh = real
        assert kfac.engine.force_inverse and sorted(kfac.engine.layer_damping.values()) == pytest.approx([0.01, 0.1, 0.1])
    else:
        train(model, kfac, opt, data[3:4])
    saved = ([v.numpy() for v in model.variables], [v.numpy() for v in optimizer_variables(opt)],
             copy.deepcopy(kfac.state_dict()))
    train(model, kfac, opt, data[4:])

    model2 = make_model()
    kfac2 = make_kfac(model2, **cfg)
    opt2 = keras.optimizers.SGD(0.1, momentum=0.9)
    opt2.build(model2.trainable_variables)
    for v, w in zip(model2.variables, saved[0]):
        v.assign(w)
    assert len(optimizer_variables(opt2)) == len(saved[1])
    for v, w in zip(optimizer_variables(opt2), saved[1]):
        v.assign(w)
    kfac2.load_state_dict(saved[2])
    train(model2, kfac2, opt2, data[4:])
    for a, b in zip(model.variables, model2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert kfac2.steps == kfac.steps == 8
    assert kfac2.engine.layer_damping == kfac.engine.layer_damping
