"""Custom TF loops: 2 ranks with local batches == 1 rank with the concatenated batch."""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.tensorflow import KFAC

import keras  # noqa: E402  (Keras 3)
from tests.tensorflow.float_dtype import set_float_dtype  # noqa: E402
LOCAL, STEPS = 4, 5


_INITIAL = []


def make_model():
    """The same initial weights (rank 0's first draw) for every model built in this process."""
    set_float_dtype("float64")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.LayerNormalization(), keras.layers.Dense(3)])
    if not _INITIAL:  # Keras initializers are not reset by tf.random.set_seed: draw once, share
        _INITIAL.extend(hvd.broadcast(tf.convert_to_tensor(v), root_rank=0, name=f"tf.equiv.init.{i}").numpy() for i, v in enumerate(model.variables))
    for v, w in zip(model.variables, _INITIAL):
        v.assign(w)
    return model


def data():
    rng = np.random.default_rng(7)
    n = hvd.size() * LOCAL
    return [(rng.normal(size=(n, 5)), rng.integers(0, 3, size=n)) for _ in range(STEPS)]


def train(kfac_factory, lo, hi):
    model = make_model()
    kfac = kfac_factory(model)
    opt = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    for x, y in data():
        with tf.GradientTape() as tape:
            logits = model(x[lo:hi])
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y[lo:hi], logits, from_logits=True))
        grads = kfac.gradient(tape, loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "mem-opt"])
def test_custom_loop_matches_single_process(strategy: str) -> None:
    check(strategy)


@pytest.mark.np4
@pytest.mark.parametrize("strategy", ["hybrid", "spngd"])
def test_custom_loop_matches_single_process_4_ranks(strategy: str) -> None:
    assert hvd.size() == 4
    check(strategy)


def check(strategy: str) -> None:
    cfg = dict(damping=0.01, factor_decay=0.8, kl_clip=0.05, lr=0.1)
    reference = train(lambda m: KFAC(m, communicator=SingleProcessCommunicator(), reduce_gradients=True,
                                     strategy="comm-opt", **cfg), None, None)
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    extra = {"grad_worker_fraction": 0.5} if strategy == "hybrid" else {}
    params = train(lambda m: KFAC(m, reduce_gradients=True, strategy=strategy, **cfg, **extra), lo, hi)
    gathered = hvd.allgather(tf.constant(params[None]), name=f"tf.equiv.{strategy}").numpy()
    for r in range(hvd.size()):
        assert np.array_equal(gathered[r], gathered[0]), f"rank {r} differs from rank 0"
    rel = np.linalg.norm(params - reference) / np.linalg.norm(reference)
    assert rel < 1e-8, f"relative difference to the 1-rank reference {rel:.2e}"


def gathered_equal_and_close(params: np.ndarray, reference: np.ndarray, tag: str) -> None:
    """Identical parameters on every rank (named allgather), close to the 1-rank reference."""
    gathered = hvd.allgather(tf.constant(params[None]), name=f"tf.equiv.{tag}").numpy()
    for r in range(hvd.size()):
        assert np.array_equal(gathered[r], gathered[0]), f"rank {r} differs from rank 0"
    rel = np.linalg.norm(params - reference) / np.linalg.norm(reference)
    assert rel < 1e-8, f"relative difference to the 1-rank reference {rel:.2e}"


@pytest.mark.parametrize("strategy", ["comm-opt", "mem-opt"])
def test_distributed_gradient_tape_in_tf_function(strategy: str) -> None:
    """hvd.DistributedGradientTape averages the variables' gradients (KAISA, reduce_gradients=False);
    the captured output gradients stay local. The step is a tf.function."""
    cfg = dict(damping=0.01, factor_decay=0.8, kl_clip=0.05, lr=0.1)
    reference = train(lambda m: KFAC(m, communicator=SingleProcessCommunicator(), reduce_gradients=True,
                                     strategy="comm-opt", **cfg), None, None)
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    model = make_model()
    kfac = KFAC(model, strategy=strategy, **cfg)
    opt = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = kfac.gradient(hvd.DistributedGradientTape(tape), loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for x, y in data():
        step(tf.constant(x[lo:hi]), tf.constant(y[lo:hi]))
    assert kfac.steps == STEPS
    params = np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])
    gathered_equal_and_close(params, reference, f"tape.{strategy}")


def fit(model, optimizer, x, y, batch_size: int, callbacks=()) -> keras.callbacks.History:
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0, callbacks=list(callbacks))


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt", "mem-opt"])
def test_model_fit_matches_single_process(strategy: str) -> None:
    """model.fit (Keras 3) with hvd_ngd's Keras DistributedOptimizer on local shards == one process
    fitting the concatenated batches; averaged epoch losses equal the reference's. Rank 1 starts
    from other weights: BroadcastGlobalVariablesCallback gives it rank 0's before the first step."""
    from hvd_ngd.tensorflow.keras import DistributedOptimizer
    from hvd_ngd.tensorflow.keras.callbacks import BroadcastGlobalVariablesCallback, MetricAverageCallback

    cfg = dict(damping=0.01, factor_decay=0.8, kl_clip=0.05)
    batches = data()
    x_all = np.concatenate([x for x, _ in batches])
    y_all = np.concatenate([y for _, y in batches])
    ref_model = make_model()
    ref_opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), ref_model,
                                   communicator=SingleProcessCommunicator(), strategy="comm-opt", **cfg)
    ref_history = fit(ref_model, ref_opt, x_all, y_all, hvd.size() * LOCAL)
    reference = np.concatenate([v.numpy().reshape(-1) for v in ref_model.trainable_variables])

    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    x_local = np.concatenate([x[lo:hi] for x, _ in batches])
    y_local = np.concatenate([y[lo:hi] for _, y in batches])
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model, strategy=strategy, **cfg)
    for v in model.trainable_variables:
        v.assign(v * (1.0 + 0.5 * hvd.rank()))
    history = fit(model, opt, x_local, y_local, LOCAL, [BroadcastGlobalVariablesCallback(0), MetricAverageCallback()])
    assert opt.kfac.steps == 2 * STEPS
    params = np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])
    gathered_equal_and_close(params, reference, f"fit.{strategy}")
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-8)
