"""The calibration cache: a JSON file reused while its machine fingerprint matches."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from hvd_ngd.costs import calibrate as calibration_runs
from hvd_ngd.costs.calibrate import CACHE_VERSION, DEFAULT_SIZES, Calibration, Measurement
from hvd_ngd.costs.model import CostModel
from hvd_ngd.enums import InverseMethod
from hvd_ngd.ops.base import Array, ArrayOps


def fingerprint(ops: ArrayOps, method: InverseMethod, dtype: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a cached model must match to be reused: backend, method, dtype, machine, versions."""
    out: Dict[str, Any] = {
        "version": CACHE_VERSION,
        "backend": ops.name,
        "method": InverseMethod(method).value,
        "dtype": dtype,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
    }
    out.update(extra or {})
    return out


def save_calibration(path: Path, calibration: Calibration, print_: Dict[str, Any]) -> None:
    """Write a calibration and its fingerprint as JSON."""
    data = {
        "fingerprint": print_,
        "model": calibration.model.to_dict(),
        "measurements": [dataclasses.asdict(m) for m in calibration.measurements],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_calibration(path: Path) -> Tuple[Dict[str, Any], Calibration]:
    """(fingerprint, calibration) read from ``save_calibration`` output.

    Raises:
        ValueError: the file is not a calibration (names the path).
    """
    try:
        data = json.loads(Path(path).read_text())
        model = CostModel.from_dict(data["model"])
        meas = tuple(Measurement(m["kind"], tuple(m["params"]), float(m["seconds"])) for m in data["measurements"])
        return data["fingerprint"], Calibration(model, meas)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a cost-model calibration ({exc}); delete it to recalibrate") from exc


def load_or_calibrate(
    path: Path,
    ops: ArrayOps,
    like: Array,
    method: InverseMethod = InverseMethod.EIGEN,
    sizes: Sequence[int] = DEFAULT_SIZES,
    dtype: str = "float32",
    device: str = "",
    extra_fingerprint: Optional[Dict[str, Any]] = None,
    recalibrate: bool = False,
    timer: Callable[[], float] = time.perf_counter,
) -> Calibration:
    """The cached calibration at ``path`` if its fingerprint matches this machine, else a new
    one (written to ``path``). A collective term already in the cache is kept."""
    clock = getattr(timer, "__name__", str(timer))
    want = fingerprint(ops, method, dtype, dict(extra_fingerprint or {}, device=device, sizes=list(sizes), clock=clock))
    path = Path(path)
    if path.exists() and not recalibrate:
        try:
            have, cached = load_calibration(path)
        except ValueError:
            have, cached = None, None
        if have == want and cached is not None:
            return cached
    calibration = calibration_runs.calibrate(ops, like, method, sizes, dtype, device, timer=timer)
    save_calibration(path, calibration, want)
    return calibration
