"""Array-operation backends: the core's math runs on any backend implementing ``ArrayOps``."""

from hvd_ngd.ops.base import ArrayOps
from hvd_ngd.ops.numpy_ops import NumpyOps

__all__ = ["ArrayOps", "NumpyOps"]
