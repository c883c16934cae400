"""PyTorch adapter of hvd_ngd: ``KFAC`` for the canonical Horovod pattern and a drop-in
``DistributedOptimizer``. Importing it imports torch and horovod.torch."""

from hvd_ngd.torch.layers import UnsupportedLayerError
from hvd_ngd.torch.preconditioner import KFAC


def __getattr__(name: str):  # lazy: horovod.torch is only needed for the optimizer
    if name == "DistributedOptimizer":
        from hvd_ngd.torch.optimizer import DistributedOptimizer

        return DistributedOptimizer
    raise AttributeError(name)


__all__ = ["KFAC", "DistributedOptimizer", "UnsupportedLayerError"]
