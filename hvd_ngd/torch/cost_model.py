"""Measure the planner's cost model with torch on the model's device (CPU or CUDA), cached.

    from hvd_ngd.torch.cost_model import calibrate_torch
    model = calibrate_torch("results/cost_model_torch.json", device="cuda").model

``calibrate_torch`` runs ``hvd_ngd.costs.calibrate`` through ``TorchOps`` (every timed call ends
in a host read, which synchronises CUDA). ``with_horovod_collective`` adds the allreduce cost per
byte measured on the running Horovod job and hands every rank rank 0's model (a collective:
every rank calls it; plans must agree across ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from hvd_ngd.costs import Calibration, CostModel, calibrate_collective, load_or_calibrate, shared_model
from hvd_ngd.costs.calibrate import DEFAULT_SIZES
from hvd_ngd.enums import InverseMethod
from hvd_ngd.torch.ops import TorchOps


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"


def calibrate_torch(
    path: Path,
    device: Optional[str] = None,
    method: InverseMethod = InverseMethod.EIGEN,
    dtype: str = "float32",
    sizes: Sequence[int] = DEFAULT_SIZES,
    recalibrate: bool = False,
) -> Calibration:
    """The cached torch calibration at ``path`` for this device, or a new one (a few seconds)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    like = torch.zeros(1, device=dev)
    name = _device_name(dev)
    return load_or_calibrate(Path(path), TorchOps(), like, method, sizes, dtype, name,
                             extra_fingerprint={"torch": torch.__version__}, recalibrate=recalibrate)


def with_horovod_collective(model: CostModel, device: Optional[str] = None) -> CostModel:
    """``model`` with Horovod's allreduce latency and seconds per byte measured at this world
    size, and rank 0's model on every rank, so that all ranks plan alike (a collective: call
    it on every rank, after ``hvd.init()``)."""
    from hvd_ngd.torch.communicator import HorovodCommunicator

    comm = HorovodCommunicator()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latency, per_byte = calibrate_collective(comm, TorchOps(), torch.zeros(1, device=dev))
    return shared_model(comm, model.with_collective(latency, per_byte))
