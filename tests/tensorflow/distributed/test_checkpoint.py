"""Checkpoint and resume mid-training (TensorFlow adapter, run by horovodrun): saving model
weights, optimizer slots and ``kfac.state_dict()`` and resuming on the same world size gives the
uninterrupted trajectory bitwise; resuming on another world size (a 2-rank checkpoint loaded by
one process, and a 1-process checkpoint loaded by 2 ranks) continues as that run would."""

from __future__ import annotations

import copy

import horovod.tensorflow as hvd
import numpy as np
import pytest
import tensorflow as tf

from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.tensorflow import KFAC

import keras  # noqa: E402  (Keras 3)
LOCAL, SAVE_AT, STEPS = 4, 3, 7

CONFIGS = [dict(strategy="spngd", damping=0.01, factor_update_interval=2, inv_update_interval=3),
           dict(strategy="comm-opt", damping=0.01, stale_inverse=True, inv_update_interval=2),
           dict(strategy="mem-opt", damping=0.01, interval_policy="adaptive", inverse_method="cholesky")]
IDS = ["spngd", "comm-opt-stale", "mem-opt-adaptive-cholesky"]


pytestmark = pytest.mark.usefixtures("float64")


def make_model() -> keras.Model:
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh", name="fc1"),
                              keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="fc2")])
    rng = np.random.default_rng(3)
    for v in model.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape))
    return model


def data():
    rng = np.random.default_rng(42)
    n = hvd.size() * LOCAL
    return [(rng.normal(size=(n, 5)), rng.integers(0, 3, size=n)) for _ in range(STEPS)]


def optimizer_variables(opt) -> list:
    return list(opt.variables() if callable(opt.variables) else opt.variables)


def setup(cfg: dict, single: bool):
    """Model, optimizer (slots built) and KFAC: on this rank's Horovod world, or alone."""
    model = make_model()
    comm = SingleProcessCommunicator() if single else None
    kfac = KFAC(model, reduce_gradients=True, communicator=comm, **cfg)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    return model, opt, kfac


def run(model, opt, kfac, batches, lo=None, hi=None) -> None:
    for x, y in batches:
        with tf.GradientTape() as tape:
            logits = model(x[lo:hi], training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y[lo:hi], logits, from_logits=True))
        grads = kfac.gradient(tape, loss, model.trainable_variables, lr=0.1)
        opt.apply_gradients(zip(grads, model.trainable_variables))


def save(model, opt, kfac) -> tuple:
    """A checkpoint in memory (kfac.state_dict() is a collective: every rank calls it)."""
    return ([v.numpy() for v in model.variables], [v.numpy() for v in optimizer_variables(opt)],
            copy.deepcopy(kfac.state_dict()))


def restore(checkpoint: tuple, model, opt, kfac) -> None:
    for v, w in zip(model.variables, checkpoint[0]):
        v.assign(w)
    assert len(optimizer_variables(opt)) == len(checkpoint[1])
    for v, w in zip(optimizer_variables(opt), checkpoint[1]):
        v.assign(w)
    kfac.load_state_dict(copy.deepcopy(checkpoint[2]))


def flat(model) -> np.ndarray:
    return np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_resume_on_the_same_and_on_one_rank(cfg: dict) -> None:
    batches = data()
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    model, opt, kfac = setup(cfg, single=False)
    run(model, opt, kfac, batches[:SAVE_AT], lo, hi)
    checkpoint = save(model, opt, kfac)
    run(model, opt, kfac, batches[SAVE_AT:], lo, hi)
    uninterrupted = flat(model)

    model2, opt2, kfac2 = setup(cfg, single=False)
    restore(checkpoint, model2, opt2, kfac2)
    run(model2, opt2, kfac2, batches[SAVE_AT:], lo, hi)
    assert np.array_equal(flat(model2), uninterrupted), "same-world resume is not bitwise identical"
    assert kfac2.steps == kfac.steps == STEPS

    # Another world size: this rank alone continues on the concatenated batch.
    model1, opt1, kfac1 = setup(cfg, single=True)
    restore(checkpoint, model1, opt1, kfac1)
    run(model1, opt1, kfac1, batches[SAVE_AT:])
    assert rel(flat(model1), uninterrupted) < 1e-8, f"1-rank resume differs by {rel(flat(model1), uninterrupted):.2e}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_resume_a_one_process_checkpoint_on_every_rank(cfg: dict) -> None:
    """A checkpoint written by one process (the concatenated batches) is loaded by every rank
    of the world (SP-NGD owners keep only their layers' statistics), which continues on local
    batches as the 1-process run does; ranks stay bitwise identical."""
    batches = data()
    model1, opt1, kfac1 = setup(cfg, single=True)
    run(model1, opt1, kfac1, batches[:SAVE_AT])
    checkpoint = save(model1, opt1, kfac1)
    run(model1, opt1, kfac1, batches[SAVE_AT:])
    reference = flat(model1)

    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    model, opt, kfac = setup(cfg, single=False)
    restore(checkpoint, model, opt, kfac)
    run(model, opt, kfac, batches[SAVE_AT:], lo, hi)
    params = flat(model)
    gathered = hvd.allgather(tf.constant(params[None]), name=f"tf.checkpoint.{cfg['strategy']}").numpy()
    for r in range(hvd.size()):
        assert np.array_equal(gathered[r], gathered[0]), f"rank {r} differs from rank 0"
    assert rel(params, reference) < 1e-8, f"{hvd.size()}-rank resume differs by {rel(params, reference):.2e}"
