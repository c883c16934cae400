"""SGD-momentum vs K-FAC (vs Adam) on scikit-learn's digits with Keras ``model.fit``, on N Horovod ranks.

    horovodrun -np 2 -H localhost:2 --gloo python examples/keras_digits.py --out results/digits_keras

The Keras twin of examples/pytorch_digits.py: a small CNN with BatchNormalization; every optimizer
starts from the same weights and sees the same data order and global batch (each global batch is
split evenly over the ranks). The Horovod Keras recipe on Keras 3: ``hvd.init()``, a distributed
optimizer (``hvd_ngd.tensorflow.keras.averaging.AveragingOptimizer``, gradients averaged with
``horovod.tensorflow``, for SGD and Adam; ``hvd_ngd.tensorflow.keras.DistributedOptimizer`` for
K-FAC), hvd_ngd's ``BroadcastGlobalVariablesCallback(0)`` and ``MetricAverageCallback``. After
every epoch BatchNorm moving statistics are averaged over ranks and the test set is evaluated.
Rank 0 shows a tqdm bar, writes ``summary.json`` (epochs, steps and seconds to 97% test accuracy,
final accuracy, per-step time) and ``digits.png`` (test accuracy and loss vs epoch and vs wall
time).

Hyperparameters (2 ranks; the sweep is in tests/tensorflow/distributed/test_digits_fit.py):
natural gradient pays off in the large-batch regime, so the global batch is 512 (2 steps per
epoch, the remainder of each epoch is dropped). K-FAC: spngd, damping 3e-2, no KL clipping,
lr 0.1; SGD-momentum lr 0.2; Adam 1e-2. Measured with seed 0 (30 epochs; with tf-keras, before the move
to Keras 3, not re-measured since): epochs to 97% SGD 14,
K-FAC 6, Adam 15. At global batch 64 with the torch example's settings (K-FAC lr 0.2, damping
3e-3, kl_clip 1e-2; SGD lr 0.1) both need 4 epochs. The Keras and torch adapters compute the
same steps (tests/tensorflow/test_cross_framework.py follows a 12-step trajectory to 1e-13):
the two examples differ in their random draws (weights, data order).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hvd_ngd.tensorflow.keras import DistributedOptimizer  # noqa: E402
from hvd_ngd.tensorflow.keras.averaging import AveragingOptimizer  # noqa: E402
from hvd_ngd.tensorflow.keras.callbacks import BroadcastGlobalVariablesCallback, MetricAverageCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGET, plot_digits  # noqa: E402

import keras  # noqa: E402  (Keras 3)
LEARNING_RATES = {"sgd": 0.2, "kfac": 0.1, "adam": 1e-2}
KFAC_CONFIG = dict(damping=3e-2, kl_clip=None, factor_decay=0.95, strategy="spngd")


def build_model(seed: int):
    """Conv-BN-ReLU x2, average pooling, dense classifier (logits); weights from ``seed``.

    Initialised like PyTorch's defaults (the twin example's): kernels and biases uniform in
    +-1/sqrt(fan_in) (``VarianceScaling(1/3, 'fan_in', 'uniform')`` for kernels), BatchNorm
    epsilon 1e-5, so the two examples differ only in the random draws.
    """
    keras.utils.set_random_seed(seed)
    L = keras.layers

    def torch_like(fan_in: int) -> dict:
        bound = fan_in**-0.5
        return dict(kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
                    bias_initializer=keras.initializers.RandomUniform(-bound, bound))

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(16, 3, padding="same", **torch_like(9)), L.BatchNormalization(momentum=0.9, epsilon=1e-5), L.ReLU(),
        L.Conv2D(32, 3, padding="same", **torch_like(9 * 16)), L.BatchNormalization(momentum=0.9, epsilon=1e-5),
        L.ReLU(), L.AveragePooling2D(2), L.Flatten(), L.Dense(10, **torch_like(32 * 4 * 4)),
    ])


def load_data(split_seed: int = 0):
    """Digits scaled to [0, 1], NHWC, a fixed stratified 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=split_seed, stratify=y)


def local_batches(xtr, ytr, epochs: int, batch_size: int, seed: int):
    """This rank's share of every global batch of every epoch, as a tf.data pipeline.

    The order depends only on ``seed`` (the same for every optimizer); each epoch is a fresh
    permutation whose last incomplete global batch is dropped. Returns (dataset, steps per epoch).
    """
    local = batch_size // hvd.size()
    steps = len(xtr) // batch_size
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for begin in range(0, steps * batch_size, batch_size):
            rows.append(order[begin + hvd.rank() * local : begin + (hvd.rank() + 1) * local])
    idx = np.concatenate(rows)
    return tf.data.Dataset.from_tensor_slices((xtr[idx], ytr[idx])).batch(local), steps


def make_optimizer(kind: str, model, lr: float):
    """The distributed optimizer of the given kind."""
    if kind == "sgd":
        return AveragingOptimizer(keras.optimizers.SGD(lr, momentum=0.9))
    if kind == "adam":
        return AveragingOptimizer(keras.optimizers.Adam(lr))
    if kind == "kfac":
        return DistributedOptimizer(keras.optimizers.SGD(lr, momentum=0.9), model, lr=lr, **KFAC_CONFIG)
    raise ValueError(f"unknown optimizer {kind!r}: choose sgd, kfac or adam")


class EpochEval(keras.callbacks.Callback):
    """Per step: time of each training step. Per epoch: average BatchNorm statistics over ranks,
    evaluate on the test set (the same on every rank), record the history and update the bar."""

    def __init__(self, kind: str, xte, yte, bar) -> None:
        super().__init__()
        self.kind, self.xte, self.yte, self.bar = kind, xte, yte, bar
        self.history: Dict[str, List[float]] = {"epoch": [], "test_accuracy": [], "test_loss": [], "train_loss": [],
                                                "seconds": []}
        self.step_seconds: List[float] = []
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_seconds.append(time.perf_counter() - self.t0)

    def on_epoch_end(self, epoch, logs=None):
        for i, v in enumerate(self.model.non_trainable_variables):  # BatchNorm moving mean / variance
            v.assign(hvd.allreduce(tf.convert_to_tensor(v), op=hvd.Average, name=f"keras_digits.{self.kind}.bn.{epoch}.{i}"))
        logits = self.model(self.xte, training=False)
        accuracy = float(np.mean(np.argmax(logits.numpy(), 1) == self.yte))
        h = self.history
        h["epoch"].append(epoch + 1)
        h["test_accuracy"].append(accuracy)
        h["test_loss"].append(float(self.loss_fn(self.yte, logits).numpy()))
        h["train_loss"].append(float(logs["loss"]))  # averaged over ranks by MetricAverageCallback
        h["seconds"].append(time.perf_counter() - self.start)
        self.bar.update(1)
        self.bar.set_postfix(acc=f"{accuracy:.3f}", loss=f"{logs['loss']:.3f}")


def train_one(kind: str, epochs: int, batch_size: int, seed: int, lr: Optional[float] = None,
              kfac_config: Optional[Dict] = None) -> Dict:
    """Train one optimizer with ``model.fit``; returns its history and summary (same on every rank)."""
    if batch_size % hvd.size():
        raise ValueError(f"global batch {batch_size} is not divisible by {hvd.size()} ranks")
    xtr, xte, ytr, yte = load_data()
    model = build_model(seed)
    lr = lr if lr is not None else LEARNING_RATES[kind]
    if kind == "kfac" and kfac_config:
        opt = DistributedOptimizer(keras.optimizers.SGD(lr, momentum=0.9), model, lr=lr,
                                   **dict(KFAC_CONFIG, **kfac_config))
    else:
        opt = make_optimizer(kind, model, lr)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data, steps_per_epoch = local_batches(xtr, ytr, epochs, batch_size, seed)
    bar = tqdm(total=epochs, desc=kind, disable=hvd.rank() != 0, leave=False)
    evaluation = EpochEval(kind, xte, yte, bar)
    callbacks = [
        BroadcastGlobalVariablesCallback(0),
        MetricAverageCallback(),  # before EpochEval: it reads the averaged training loss
        evaluation,
    ]
    model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, callbacks=callbacks)
    bar.close()
    h = evaluation.history
    reached = [i for i, a in enumerate(h["test_accuracy"]) if a >= TARGET]
    first = reached[0] if reached else None
    steady = evaluation.step_seconds[1:] or evaluation.step_seconds  # step 1 includes tracing
    return {
        "optimizer": kind,
        "lr": lr,
        "config": dict(KFAC_CONFIG, **(kfac_config or {})) if kind == "kfac" else {},
        "global_batch": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "history": h,
        "epochs_to_target": h["epoch"][first] if first is not None else None,
        "steps_to_target": (first + 1) * steps_per_epoch if first is not None else None,
        "seconds_to_target": h["seconds"][first] if first is not None else None,
        "final_accuracy": h["test_accuracy"][-1],
        "seconds_per_step": float(np.mean(steady)),
        "first_step_seconds": evaluation.step_seconds[0],
        "params": np.concatenate([v.numpy().reshape(-1) for v in model.trainable_variables]),
    }


def run(
    optimizers: Sequence[str] = ("sgd", "kfac", "adam"),
    epochs: int = 30,
    batch_size: int = 512,
    seed: int = 0,
    lrs: Optional[Dict[str, float]] = None,
    kfac_config: Optional[Dict] = None,
) -> Dict[str, Dict]:
    """Train each optimizer in turn from the same initial weights (``lrs`` overrides rates)."""
    lrs = lrs or {}
    return {kind: train_one(kind, epochs, batch_size, seed, lrs.get(kind), kfac_config) for kind in optimizers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512, help="global batch size")
    parser.add_argument("--optimizers", default="sgd,kfac,adam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/digits_keras")
    parser.add_argument("--lr", default="", help="overrides, e.g. sgd=0.1,kfac=0.05")
    parser.add_argument("--kfac", default="", help="K-FAC config overrides as JSON, e.g. '{\"damping\": 0.01}'")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    hvd.init()
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    start = time.perf_counter()
    results = run(args.optimizers.split(","), args.epochs, args.batch_size, args.seed, lrs,
                  json.loads(args.kfac) if args.kfac else None)
    if hvd.rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {k: dict({kk: vv for kk, vv in v.items() if kk != "params"}, ranks=hvd.size(), seed=args.seed,
                           target=TARGET) for k, v in results.items()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        batch = next(iter(results.values()))["global_batch"]
        plot_digits(results, out / "digits.png", f"digits, Keras model.fit, {hvd.size()} Horovod ranks, global batch {batch}")
        for kind, res in results.items():
            print(f"{kind:>5} (lr {res['lr']:g}): epochs to {TARGET:.0%}: {res['epochs_to_target']}, "
                  f"seconds to {TARGET:.0%}: {res['seconds_to_target'] and round(res['seconds_to_target'], 1)}, "
                  f"final accuracy {res['final_accuracy']:.4f}, {1000 * res['seconds_per_step']:.1f} ms/step")
        print(f"summary: {out / 'summary.json'}\nplot: {out / 'digits.png'}\n"
              f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
