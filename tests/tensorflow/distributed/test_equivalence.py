"""Custom TF loops: 2 ranks with local batches == 1 rank with the concatenated batch."""

from __future__ import annotations

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.tensorflow import KFAC

keras = tf.keras
LOCAL, STEPS = 4, 5


_INITIAL = []


def make_model():
    """The same initial weights (rank 0's first draw) for every model built in this process."""
    keras.backend.set_floatx("float64")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                              keras.layers.LayerNormalization(), keras.layers.Dense(3)])
    if not _INITIAL:  # Keras initializers are not reset by tf.random.set_seed: draw once, share
        _INITIAL.extend(hvd.broadcast(v, root_rank=0, name=f"tf.equiv.init.{i}").numpy() for i, v in enumerate(model.variables))
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
