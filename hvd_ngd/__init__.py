"""hvd_ngd: distributed natural-gradient preconditioning for Horovod jobs.

The framework-neutral core lives here; the adapters are ``hvd_ngd.torch`` and
``hvd_ngd.tensorflow`` (imported explicitly: this package imports no framework).
"""

from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import RankMismatchError
from hvd_ngd.engine import CurvatureWarning, Preconditioner
from hvd_ngd.enums import (
    AssignmentCost,
    FisherType,
    IntervalPolicy,
    InverseMethod,
    LayerKind,
    LossReduction,
    Strategy,
    WireDtype,
)
from hvd_ngd.keys import Statistic, StatKey
from hvd_ngd.stale import StalenessCounts

__all__ = [
    "AssignmentCost",
    "CurvatureWarning",
    "FisherType",
    "IntervalPolicy",
    "InverseMethod",
    "KFACConfig",
    "LayerKind",
    "LossReduction",
    "Preconditioner",
    "RankMismatchError",
    "StalenessCounts",
    "StatKey",
    "Statistic",
    "Strategy",
    "WireDtype",
]
