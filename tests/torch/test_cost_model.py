"""Torch calibration of the planner's cost model (CPU here), cached; the planner accepts it."""

from __future__ import annotations

import torch

from hvd_ngd.assignment import SplitPolicy, assign
from hvd_ngd.models import resnet50_layer_specs
from hvd_ngd.torch.cost_model import calibrate_torch


def test_torch_calibration_is_cached_and_plans(tmp_path) -> None:
    torch.set_num_threads(1)
    path = tmp_path / "torch_cost.json"
    first = calibrate_torch(path, device="cpu", sizes=(16, 32, 64, 128))
    assert first.model.backend == "torch" and first.model.device.startswith("cpu")
    assert first.model.inverse_seconds(1024) > first.model.inverse_seconds(128) > 0
    again = calibrate_torch(path, device="cpu", sizes=(16, 32, 64, 128))
    assert again == first  # read back from the cache, not re-timed
    plan = assign(resnet50_layer_specs(), 64, cost_model=first.model, split=SplitPolicy())
    assert plan.makespan_ratio <= 1.1 and plan.split_statistics()
