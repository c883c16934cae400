"""Measured cost model: fitting, predictions, calibration on this machine, JSON cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.costs import CostModel, calibrate, calibrate_collective, fit_nonnegative, load_or_calibrate
from hvd_ngd.enums import InverseMethod
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()
LIKE = np.zeros(1, dtype=np.float32)


def test_fit_recovers_coefficients_and_keeps_them_nonnegative() -> None:
    n = np.array([32.0, 64, 128, 256, 512, 1024])
    feats = np.stack([n**3, n**2, np.ones_like(n)], 1)
    true = np.array([5e-10, 3e-8, 2e-5])
    np.testing.assert_allclose(fit_nonnegative(feats, feats @ true), true, rtol=1e-6)
    # times that a negative n^2 term would fit best: the coefficient is dropped, not negative
    coef = fit_nonnegative(feats, feats @ np.array([5e-10, -1e-8, 2e-3]))
    assert np.all(coef >= 0) and coef[1] == 0.0
    with pytest.raises(ValueError, match="> 0"):
        fit_nonnegative(feats, np.zeros(6))
    with pytest.raises(ValueError, match="disagree"):
        fit_nonnegative(feats, np.ones(5))


def test_predictions_by_hand() -> None:
    m = CostModel("eigen", (1.0, 2.0, 3.0), (0.5, 0.25, 0.125, 1.5), (0.75, 0.5), collective=(1e-3, 1e-9))
    assert m.inverse_seconds(2) == 8 + 8 + 3
    assert m.inverse_seconds(10, diagonal=True) == 0.75 * 10 + 0.5
    # g = [2, 2], a = [3]: cols*sum g^2 = 3*8, rows*sum a^2 = 4*9, elements 12, matmuls 3
    assert m.precondition_seconds([2, 2], [3]) == 0.5 * (24 + 36) + 0.25 * 12 + 0.125 * 3 + 1.5
    assert m.precondition_seconds([2, 2], [3], a_diagonal=True) == 0.5 * 24 + 0.25 * 12 + 0.125 * 2 + 1.5
    assert m.unitwise_seconds(4) == 0.75 * 4 + 0.5
    assert m.collective_seconds(1e6) == pytest.approx(1e-3 + 1e-3)
    assert CostModel("eigen", (0, 0, 0), (0, 0, 0, 0)).collective_seconds(10) == 0.0
    assert CostModel.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(ValueError, match="each >= 0"):
        CostModel("eigen", (1.0, -1.0, 0.0), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="recalibrate"):
        CostModel.from_dict({"method": "eigen"})


@pytest.mark.parametrize("method", list(InverseMethod))
def test_calibration_takes_seconds_and_predicts_what_it_measured(method: InverseMethod) -> None:
    import time

    start = time.perf_counter()
    cal = calibrate(OPS, LIKE, method, sizes=(16, 32, 64, 128, 256))
    assert time.perf_counter() - start < 10.0
    assert cal.model.method is method and cal.model.backend == "numpy"
    assert len(cal.measurements) == 5 + 15 + 5 and all(m.seconds > 0 for m in cal.measurements)
    # a shared 2-core machine is noisy: the fit is within a factor of a few of every point and
    # orders the sizes correctly
    assert all(abs(e) < 3.0 for e in cal.relative_errors())
    assert cal.model.inverse_seconds(4096) > 50 * cal.model.inverse_seconds(256)
    with pytest.raises(ValueError, match="at least 3"):
        calibrate(OPS, LIKE, method, sizes=(16, 32))


def test_cache_is_reused_until_the_fingerprint_changes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cost.json"
    first = load_or_calibrate(path, OPS, LIKE, sizes=(8, 16, 32))
    assert path.exists()
    calls = []
    module = sys.modules["hvd_ngd.costs.calibrate"]  # load_or_calibrate calls it through the module
    real = module.calibrate
    monkeypatch.setattr(module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert load_or_calibrate(path, OPS, LIKE, sizes=(8, 16, 32)) == first and calls == []
    load_or_calibrate(path, OPS, LIKE, sizes=(8, 16, 32), device="other")
    assert calls == [1]
    path.write_text("{not json")
    load_or_calibrate(path, OPS, LIKE, sizes=(8, 16, 32))
    assert calls == [1, 1] and json.loads(path.read_text())["fingerprint"]["backend"] == "numpy"


def test_collective_calibration_on_a_communicator() -> None:
    latency, per_byte = calibrate_collective(SingleProcessCommunicator(), OPS, LIKE, (1 << 10, 1 << 14, 1 << 18))
    assert latency >= 0 and per_byte >= 0
    model = CostModel("eigen", (0, 0, 0), (0, 0, 0, 0)).with_collective(latency, per_byte)
    assert model.collective_seconds(1 << 18) >= 0
    with pytest.raises(ValueError, match="at least 2"):
        calibrate_collective(SingleProcessCommunicator(), OPS, LIKE, (1 << 10,))


def test_curvature_benchmark_executes_every_rank_share() -> None:
    import time

    from hvd_ngd.assignment import SplitPolicy
    from hvd_ngd.costs.benchmark import benchmark_markdown, curvature_benchmark
    from hvd_ngd.models import resnet50_layer_specs

    specs = resnet50_layer_specs(num_classes=10, width=2)
    model = calibrate(OPS, LIKE, sizes=(8, 16, 32, 64)).model
    rows = curvature_benchmark(OPS, LIKE, specs, model, worlds=(1, 2, 4), timer=time.thread_time)
    assert [r["ranks"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert r["measured_s"] > 0 and r["predicted_s"] > 0
        assert r["predicted_total_s"] == pytest.approx(rows[0]["predicted_total_s"])
    assert rows[2]["predicted_s"] < rows[0]["predicted_s"]
    blocks = {("layer4.0.conv2", "A"): 3, ("layer4.0.conv2", "G"): 2, ("fc", "A"): 2}
    split = curvature_benchmark(OPS, LIKE, specs, model, worlds=(2,), blocks=blocks)
    assert split[0]["measured_s"] > 0 and split[0]["predicted_total_s"] < rows[0]["predicted_total_s"]
    with pytest.raises(ValueError, match="either split"):
        curvature_benchmark(OPS, LIKE, specs, model, worlds=(2,), blocks=blocks, split=SplitPolicy())
    table = benchmark_markdown(rows, "title")
    assert table.startswith("title") and table.count("\n| ") == 4


def test_every_rank_plans_with_rank_zeros_model() -> None:
    from hvd_ngd.costs import shared_model
    from hvd_ngd.testing.threaded_world import ThreadedWorld

    def per_rank(comm):
        latency, per_byte = calibrate_collective(comm, OPS, LIKE, (1 << 10, 1 << 14))
        own = CostModel("eigen", (1e-9 * (comm.rank + 1), 0, 0), (0, 0, 0, 0)).with_collective(latency, per_byte)
        return own, shared_model(comm, own)

    results = ThreadedWorld(3).run(per_rank)
    assert len({own.inverse for own, _ in results}) == 3
    assert all(shared == results[0][0] for _, shared in results)


def test_numpy_curvature_report(tmp_path) -> None:
    from hvd_ngd.costs.benchmark import numpy_curvature_report

    text, rows, model = numpy_curvature_report(tmp_path / "c.json", width=2, worlds=(1, 2))
    assert (tmp_path / "c.json").exists() and model.backend == "numpy"
    assert [r["ranks"] for r in rows] == [1, 2] and "thread CPU time" in text
