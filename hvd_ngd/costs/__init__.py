"""Measured cost model of the curvature work (decompositions, preconditioning, collectives)."""

from hvd_ngd.costs.cache import load_calibration, load_or_calibrate, save_calibration
from hvd_ngd.costs.calibrate import (
    Calibration,
    Measurement,
    calibrate,
    calibrate_collective,
    fit_nonnegative,
    shared_model,
)
from hvd_ngd.costs.model import CostModel

__all__ = [
    "Calibration",
    "CostModel",
    "Measurement",
    "calibrate",
    "calibrate_collective",
    "fit_nonnegative",
    "load_calibration",
    "load_or_calibrate",
    "save_calibration",
    "shared_model",
]
