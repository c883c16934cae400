"""The preconditioner engine: one concept per module (state, placement, schedule, curvature
math, wire codec, batch statistics) wired together by ``Preconditioner``."""

from hvd_ngd.engine.curvature import CurvatureWarning
from hvd_ngd.engine.preconditioner import Preconditioner

__all__ = ["CurvatureWarning", "Preconditioner"]
