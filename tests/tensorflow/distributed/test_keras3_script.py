"""A plain Keras 3 + Horovod training script (``import keras``, no legacy flag) switched to K-FAC
by changing one line trains on 2 ranks with identical weights on every rank, from rank-dependent
initial weights, and its gradients are averaged (without averaging the ranks' different shards
would drive the weights apart, as the unwrapped optimizer does)."""

from __future__ import annotations

import difflib
import runpy
from pathlib import Path

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

SCRIPT = '''
import os
import keras
import horovod.tensorflow as hvd
import numpy as np
from hvd_ngd.tensorflow.keras import DistributedOptimizer
from hvd_ngd.tensorflow.keras.averaging import AveragingOptimizer
from hvd_ngd.tensorflow.keras.callbacks import BroadcastGlobalVariablesCallback, MetricAverageCallback

assert "TF_USE_LEGACY_KERAS" not in os.environ and keras.__version__.startswith("3.")
hvd.init()
keras.utils.set_random_seed(hvd.rank())  # different initial weights on every rank
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
y = (x.mean((1, 2, 3)) > 0).astype("int64") + 2 * (x[:, :4].mean((1, 2, 3)) > 0)
x, y = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]  # this rank's shard
model = keras.Sequential([
    keras.Input((8, 8, 1)),
    keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.BatchNormalization(),
    keras.layers.Flatten(), keras.layers.Dense(16, activation="tanh"), keras.layers.LayerNormalization(),
    keras.layers.Dense(4),
])
optimizer = AveragingOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))
model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                    callbacks=[BroadcastGlobalVariablesCallback(0), MetricAverageCallback()])
'''
BASELINE = "optimizer = AveragingOptimizer(keras.optimizers.SGD(0.05, momentum=0.9))"
KFAC = "optimizer = DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), model, damping=3e-2)"
PLAIN = "optimizer = keras.optimizers.SGD(0.05, momentum=0.9)"


def run(source: str, tmp_path: Path, tag: str) -> dict:
    path = tmp_path / f"{tag}_rank{hvd.rank()}.py"
    path.write_text(source)
    return runpy.run_path(str(path))


def params(namespace: dict) -> np.ndarray:
    return np.concatenate([v.numpy().reshape(-1) for v in namespace["model"].trainable_variables])


def gathered(p: np.ndarray, tag: str) -> np.ndarray:
    return hvd.allgather(tf.constant(p[None]), name=f"keras3_script.{tag}").numpy()


def test_one_changed_line_trains_with_kfac_on_2_ranks_identically(tmp_path: Path) -> None:
    assert hvd.size() == 2
    kfac_source = SCRIPT.replace(BASELINE, KFAC)
    changed = [line for line in difflib.unified_diff(SCRIPT.splitlines(), kfac_source.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == [f"-{BASELINE}", f"+{KFAC}"]

    kfac = run(kfac_source, tmp_path, "kfac")
    opt = kfac["model"].optimizer
    assert opt.kfac.steps == 3 * 4 and opt.kfac.config.strategy.value == "spngd"
    assert sorted(type(layer.layer).__name__ for layer in opt.kfac.layers) == [
        "BatchNormalization", "Conv2D", "Dense", "Dense", "LayerNormalization"]
    k = gathered(params(kfac), "kfac")
    assert np.array_equal(k[0], k[1]), "K-FAC: ranks ended with different weights"
    assert all(np.isfinite(h).all() for h in kfac["history"].history["loss"])

    baseline = run(SCRIPT, tmp_path, "sgd")
    b = gathered(params(baseline), "sgd")
    assert np.array_equal(b[0], b[1]), "averaged SGD: ranks ended with different weights"
    assert not np.allclose(k[0], b[0], rtol=1e-3), "K-FAC changed nothing"

    plain = run(SCRIPT.replace(BASELINE, PLAIN), tmp_path, "plain")  # control: no averaging at all
    p = gathered(params(plain), "plain")
    assert not np.allclose(p[0], p[1]), "without averaging the ranks should drift apart (the test would prove nothing)"
