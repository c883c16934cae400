"""Smoke tests of the Keras examples on 2 ranks: examples/keras_digits.py trains, summarises and
plots with identical parameters on every rank; examples/keras_synthetic_benchmark.py measures
SGD and a K-FAC variant and counts K-FAC's bytes."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_digits_runs_summarises_and_plots(tmp_path: Path) -> None:
    digits = load("keras_digits")
    results = digits.run(optimizers=("sgd", "kfac"), epochs=2, batch_size=512, seed=0)
    for kind, res in results.items():
        assert res["history"]["epoch"] == [1, 2] and res["steps_per_epoch"] == 2
        assert 0.0 < res["final_accuracy"] <= 1.0 and res["seconds_per_step"] > 0
        gathered = hvd.allgather(tf.constant(res["params"][None]), name=f"examples.digits.{kind}").numpy()
        assert np.array_equal(gathered[0], gathered[1]), f"{kind}: ranks ended with different parameters"
    assert results["kfac"]["config"]["strategy"] == "spngd"
    if hvd.rank() == 0:
        digits.plot_digits(results, tmp_path / "digits.png", "digits")
        assert (tmp_path / "digits.png").stat().st_size > 10_000


def test_keras_synthetic_benchmark_measures_sgd_and_kfac() -> None:
    bench = load("keras_synthetic_benchmark")
    args = argparse.Namespace(model="small", batch_size=4, warmup=1, iters=2, assignment_cost="communication")
    sgd = bench.bench_one("sgd", "-", args)
    kfac = bench.bench_one("every-step", "spngd", args)
    assert sgd["images_per_sec"] > 0 and kfac["images_per_sec"] > 0
    assert sgd["bytes_per_step"] > 0 and kfac["bytes_per_step"] > sgd["bytes_per_step"]  # factors on top
    assert kfac["skipped_fraction"] == 0.0
