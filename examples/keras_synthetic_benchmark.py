"""Images/sec of SGD vs K-FAC variants with Keras, side by side, in the spirit of Horovod's
tensorflow2_keras_synthetic_benchmark.py (random data, so only speed is measured).

    horovodrun -np 2 -H localhost:2 --gloo python examples/keras_synthetic_benchmark.py --out results/bench/keras_np2.json

The Keras twin of examples/pytorch_synthetic_benchmark.py: the same small bottleneck ResNet
(``--model resnet50`` for the real one), trained with ``model.train_on_batch`` (Keras' compiled
train step, Keras 3). Variants: SGD (``hvd_ngd.tensorflow.keras.averaging.AveragingOptimizer``: the
gradients averaged with one ``horovod.tensorflow`` grouped allreduce inside the compiled step, the
Keras 3 stand-in for Horovod's Keras optimizer, which fails on Keras 3) and, per strategy,
``hvd_ngd.tensorflow.keras.DistributedOptimizer`` with every-step updates, fixed intervals
(factors every 10 steps, inverses every 100) and the adaptive stale-statistics rule. Reported per
variant: images/sec, time per step relative to SGD, modelled bytes sent per rank per step (ring
algorithms) relative to SGD's gradient allreduce, and the fraction of statistics skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import time  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Tuple  # noqa: E402

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.tensorflow.keras import DistributedOptimizer  # noqa: E402
from hvd_ngd.tensorflow.keras.averaging import AveragingOptimizer  # noqa: E402
from hvd_ngd.tensorflow.keras.callbacks import broadcast_variables  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VARIANTS, benchmark_parser, benchmark_row, report  # noqa: E402

import keras  # noqa: E402  (Keras 3)
L = keras.layers



def bottleneck(x: Any, planes: int, stride: int) -> Any:
    """ResNet v1.5 bottleneck block (functional API)."""
    cout = planes * 4
    y = L.Conv2D(planes, 1, use_bias=False)(x)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.Conv2D(planes, 3, strides=stride, padding="same", use_bias=False)(y)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.BatchNormalization()(L.Conv2D(cout, 1, use_bias=False)(y))
    if stride != 1 or x.shape[-1] != cout:
        x = L.BatchNormalization()(L.Conv2D(cout, 1, strides=stride, use_bias=False)(x))
    return L.ReLU()(L.Add()([x, y]))


def build(name: str) -> Tuple[Any, Tuple[int, int, int], int]:
    """Model, input shape (NHWC without N) and number of classes."""
    if name == "resnet50":
        blocks, width, classes, shape = [3, 4, 6, 3], 64, 1000, (224, 224, 3)
    else:
        blocks, width, classes, shape = [1, 1], 16, 10, (32, 32, 3)
    inputs = keras.Input(shape)
    if name == "resnet50":
        x = L.Conv2D(width, 7, strides=2, padding="same", use_bias=False)(inputs)
        x = L.MaxPooling2D(3, 2, padding="same")(L.ReLU()(L.BatchNormalization()(x)))
    else:
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(inputs)))
    for stage, count in enumerate(blocks):
        for b in range(count):
            x = bottleneck(x, width * 2**stage, 2 if b == 0 and stage > 0 else 1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(classes)(x)), shape, classes


def bench_one(variant: str, strategy: str, args: argparse.Namespace, graph_step: bool = True) -> Dict[str, Any]:
    keras.utils.set_random_seed(0)
    model, shape, classes = build(args.model)
    sgd = keras.optimizers.SGD(0.01, momentum=0.9)
    if variant == "sgd":
        opt = AveragingOptimizer(sgd)
    else:
        opt = DistributedOptimizer(sgd, model, strategy=strategy, damping=1e-3, lr=0.01,
                                   assignment_cost=args.assignment_cost if strategy == "spngd" else "compute",
                                   graph_step=graph_step, **VARIANTS[variant])
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    broadcast_variables(model.variables, 0, "bench.init")
    rng = np.random.default_rng(hvd.rank())
    x = tf.constant(rng.standard_normal((args.batch_size, *shape)).astype(np.float32))
    y = tf.constant(rng.integers(0, classes, args.batch_size))
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    kfac = getattr(opt, "kfac", None)
    bytes_before = kfac.comm.bytes_sent if kfac is not None else 0
    start = time.perf_counter()
    for _ in range(args.iters):
        model.train_on_batch(x, y)
    elapsed = time.perf_counter() - start
    param_bytes = sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in model.trainable_variables)
    n = hvd.size()
    if kfac is None:
        sent, skipped = 2.0 * (n - 1) / n * param_bytes, 0.0
    else:  # the Keras optimizer reduces every gradient itself: all bytes are counted
        skipped = kfac.statistics_counts.skipped_fraction  # (also accounts for steps taken in the graph)
        sent = (kfac.comm.bytes_sent - bytes_before) / args.iters
    label = variant if graph_step else f"{variant}/eager"
    return benchmark_row(label, strategy if kfac is not None else "-", elapsed, args.iters, args.batch_size * n,
                         sent, skipped)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank")
    parser.add_argument("--compare-graph-step", action="store_true",
                        help="also run every K-FAC row with graph_step=False (rows '<variant>/eager')")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    hvd.init()
    rows: List[Dict[str, Any]] = [bench_one("sgd", "-", args)]
    for strategy in args.strategies.split(","):
        for variant in args.variants.split(","):
            rows.append(bench_one(variant, strategy, args))
            if args.compare_graph_step:
                rows.append(bench_one(variant, strategy, args, graph_step=False))
    if hvd.rank() == 0:
        report(rows, args, "keras", hvd.size(), "CPU")


if __name__ == "__main__":
    main()
