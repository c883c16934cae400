"""Faults across ranks (TensorFlow adapter, run by horovodrun): ranks that build different
models or configs fail at construction, and ranks whose hyperparameters drift apart fail at the
next step, on every rank with the same message and never a hang; a non-finite statistic or a
failed decomposition on one rank leaves every rank with the same finite parameters."""

from __future__ import annotations

import warnings

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.consistency import RankMismatchError
from hvd_ngd.preconditioner import CurvatureWarning
from hvd_ngd.tensorflow import KFAC
from hvd_ngd.tensorflow.preconditioner import optimizer_hyperparameters

import keras  # noqa: E402  (Keras 3)
LOCAL, IN, HIDDEN = 4, 4, 6


pytestmark = pytest.mark.usefixtures("float64")


def make_model(width: int = 3, names=("fc1", "ln", "fc2")) -> keras.Model:
    """The same weights on every rank (numpy draws with a fixed seed)."""
    model = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(HIDDEN, activation="tanh", name=names[0]),
                              keras.layers.LayerNormalization(name=names[1]), keras.layers.Dense(width, name=names[2])])
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape))
    return model


def local_batches(steps: int):
    rng = np.random.default_rng(11)
    n = hvd.size() * LOCAL
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    return [(x[lo:hi], y[lo:hi]) for x, y in
            ((rng.normal(size=(n, IN)), rng.integers(0, 3, size=n)) for _ in range(steps))]


def loss_of(model, x, y):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True), from_logits=True))


def flat(model) -> np.ndarray:
    return np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])


def same_on_every_rank(values: np.ndarray, tag: str) -> None:
    gathered = hvd.allgather(tf.constant(values[None]), name=f"tf.faults.{tag}").numpy()
    for r in range(hvd.size()):
        assert np.array_equal(gathered[r], gathered[0]), f"rank {r} differs from rank 0 ({tag})"


# ---------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(width=3 + hvd.rank()), r"layers differ between rank 0 and rank 1: position 2: .*'fc2'"),
     (dict(names=("fc1", "ln", "fc2") if hvd.rank() == 0 else ("fc1", "fc2", "ln")), r"position 1: rank 0 has \('ln'")],
    ids=["different-width", "another-order"],
)
def test_different_models_raise_on_every_rank_at_construction(kwargs, match) -> None:
    model = make_model(**kwargs)
    with pytest.raises(RankMismatchError, match=match):
        KFAC(model, reduce_gradients=True, strategy="spngd", damping=0.01)
    same_on_every_rank(np.array([1.0]), "after-model-mismatch")  # no collective was left pending


def test_different_config_raises_on_every_rank_naming_the_value() -> None:
    with pytest.raises(RankMismatchError, match=r"config differs between rank 0 and rank 1: .*damping: 0\.01 vs 0\.02"):
        KFAC(make_model(), reduce_gradients=True, strategy="spngd", damping=0.01 * (1 + hvd.rank()))
    with pytest.raises(RankMismatchError, match=r"strategy: 'spngd' vs 'comm-opt'"):
        KFAC(make_model(), reduce_gradients=True, strategy="spngd" if hvd.rank() == 0 else "comm-opt")


# ---------------------------------------------------------------------------------------------- drifting values
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_learning_rate_drifting_on_one_rank_raises_on_every_rank_at_the_next_step(strategy: str, compiled: bool) -> None:
    """Rank 1 halves the learning rate it passes at step 2: every rank raises at step 2 naming
    lr and each rank's value, before any gradient is exchanged; the weights stay as they were."""
    model = make_model()
    kfac = KFAC(model, reduce_gradients=True, strategy=strategy, damping=0.01, lr=0.05, factor_update_interval=1, inv_update_interval=1)
    opt = keras.optimizers.SGD(0.05, momentum=0.9)
    lr = tf.Variable(0.05, dtype=tf.float64)

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(model, x, y)
        grads = kfac.gradient(tape, loss, model.trainable_variables, lr=lr)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    run = tf.function(train_step) if compiled else train_step
    expected = (tf.errors.InvalidArgumentError,) if compiled else (RankMismatchError,)
    for step, (x, y) in enumerate(local_batches(3)):
        if step == 2:
            lr.assign(0.05 if hvd.rank() == 0 else 0.025)
            before = [v.numpy().copy() for v in model.variables]
            with pytest.raises(expected, match=r"at step 2: lr: rank 0 has 0\.05, rank 1 has 0\.025") as info:
                run(tf.constant(x), tf.constant(y))
            if compiled:  # py_function re-raises ValueErrors as InvalidArgumentError; the class is named
                assert "RankMismatchError" in str(info.value)
            break
        run(tf.constant(x), tf.constant(y))
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg="a mismatched step changed the weights")
    assert kfac.steps == 2
    same_on_every_rank(flat(model), f"lr-drift.{strategy}.{compiled}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_optimizer_hyperparameters_passed_to_gradient_are_compared(strategy: str, compiled: bool) -> None:
    """The optimizer's values (``optimizer_hyperparameters``: here a momentum that differs per
    rank) join the per-step check, eagerly and inside a tf.function (as model.fit runs it)."""
    model = make_model()
    kfac = KFAC(model, reduce_gradients=True, strategy=strategy, damping=0.01, factor_update_interval=1, inv_update_interval=1)
    opt = keras.optimizers.SGD(0.05, momentum=0.9 if hvd.rank() == 0 else 0.5)

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(model, x, y)
        grads = kfac.gradient(tape, loss, model.trainable_variables, lr=opt.learning_rate,
                              hyperparameters=optimizer_hyperparameters(opt))
        opt.apply_gradients(zip(grads, model.trainable_variables))

    x, y = local_batches(1)[0]
    before = flat(model)
    expected = tf.errors.InvalidArgumentError if compiled else RankMismatchError
    with pytest.raises(expected, match=r"at step 0: momentum: rank 0 has 0\.9, rank 1 has 0\.5\."):
        (tf.function(train_step) if compiled else train_step)(tf.constant(x), tf.constant(y))
    assert kfac.steps == 0 and np.array_equal(flat(model), before)


# ---------------------------------------------------------------------------------------------- numerical faults
def poison_fc2_activations(kfac: KFAC) -> None:
    layer = next(layer for layer in kfac.layers if layer.name == "fc2")
    rec = layer.records[-1]
    rec.inputs = tf.tensor_scatter_nd_update(rec.inputs, [[0, 0]], tf.constant([np.nan], rec.inputs.dtype))


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "mem-opt"])
def test_nan_on_one_rank_keeps_every_rank_identical_and_finite(strategy: str) -> None:
    """Rank 1 alone sees a NaN in fc2's activations at step 1: the layer falls back on every
    rank (its averaged statistic is NaN), with a warning where the fallback is decided, and all
    ranks keep identical, finite parameters."""
    model = make_model()
    kfac = KFAC(model, reduce_gradients=True, strategy=strategy, damping=0.01, factor_update_interval=1, inv_update_interval=1)
    opt = keras.optimizers.SGD(0.05, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CurvatureWarning)
        for step, (x, y) in enumerate(local_batches(4)):
            with tf.GradientTape() as tape:
                loss = loss_of(model, x, y)
            if step == 1 and hvd.rank() == 1:
                poison_fc2_activations(kfac)
            grads = kfac.gradient(tape, loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
    fell_back = [(s, n) for s, n, _ in kfac.engine.fallbacks]
    deciders = [kfac.engine.layer_owner("fc2")] if strategy == "spngd" else list(range(hvd.size()))
    if hvd.rank() in deciders:
        assert fell_back == [(1, "fc2")]
        assert any("layer 'fc2' uses its plain gradient at step 1: non-finite statistic fc2/A" in str(w.message)
                   for w in caught)
    assert np.isfinite(flat(model)).all()
    assert all(np.isfinite(v.numpy()).all() for v in kfac.engine.factors.values())
    same_on_every_rank(flat(model), f"nan.{strategy}")


@pytest.mark.parametrize("strategy", ["comm-opt", "spngd", "mem-opt"])
def test_failed_decomposition_on_the_worker_keeps_ranks_consistent(strategy: str, monkeypatch) -> None:
    """fc2's A fails to decompose at step 1 (only its inverse worker decomposes it): every rank
    uses fc2's plain gradient, escalates the same damping, and training goes on identically."""
    model = make_model()
    kfac = KFAC(model, reduce_gradients=True, strategy=strategy, damping=0.01, factor_update_interval=1, inv_update_interval=1)
    opt = keras.optimizers.SGD(0.05, momentum=0.9)
    real = kfac.ops.eigh

    def eigh(x):
        if kfac.steps == 1 and tuple(x.shape) == (HIDDEN + 1, HIDDEN + 1):
            raise tf.errors.InvalidArgumentError(None, None, "Eigen decomposition was not successful")
        return real(x)

    monkeypatch.setattr(kfac.ops, "eigh", eigh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurvatureWarning)
        for x, y in local_batches(4):
            with tf.GradientTape() as tape:
                loss = loss_of(model, x, y)
            grads = kfac.gradient(tape, loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
    assert kfac.engine.layer_damping["fc2"] == pytest.approx(0.1)
    assert np.isfinite(flat(model)).all()
    same_on_every_rank(flat(model), f"decomposition.{strategy}")


def test_model_fit_with_momentum_differing_raises_on_every_rank_naming_it() -> None:
    """hvd_ngd's Keras optimizer puts the optimizer's momentum into the per-step check: a rank
    compiled with another momentum stops model.fit at the first step on every rank, weights intact."""
    from hvd_ngd.tensorflow.keras import DistributedOptimizer

    model = make_model()
    before = flat(model)
    sgd = keras.optimizers.SGD(0.05, momentum=0.9 if hvd.rank() == 0 else 0.5)
    model.compile(optimizer=DistributedOptimizer(sgd, model, damping=0.01, factor_update_interval=1, inv_update_interval=1), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    (x, y), = local_batches(1)
    with pytest.raises((RankMismatchError, tf.errors.InvalidArgumentError), match=r"momentum: rank 0 has 0.9, rank 1 has 0.5"):
        model.fit(x, y, batch_size=LOCAL, epochs=1, verbose=0)
    np.testing.assert_array_equal(flat(model), before)
