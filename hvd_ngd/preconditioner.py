"""Compatibility import path of the engine (``hvd_ngd.engine``)."""

from hvd_ngd.engine.curvature import CurvatureWarning
from hvd_ngd.engine.preconditioner import Preconditioner

__all__ = ["CurvatureWarning", "Preconditioner"]
