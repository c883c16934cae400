"""``AveragingOptimizer``: plain data-parallel Keras 3 training with Horovod-averaged gradients.

The Keras 3 stand-in for ``horovod.tensorflow.keras.DistributedOptimizer`` (which fails on
Keras 3 variables): the SGD/Adam baselines of the examples and benchmarks, and any optimizer a
user wants to run next to hvd_ngd's. Its ``apply`` averages the gradients with one
``hvd.grouped_allreduce`` (Horovod fuses the group into as few ring allreduces as its fusion
buffer allows) inside the compiled train step, then runs the optimizer's own update.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import horovod.tensorflow as hvd
import tensorflow as tf

from hvd_ngd.tensorflow.keras_version import require_keras, require_keras_object

keras = require_keras()


def _apply(self: Any, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]] = None) -> Any:
    """``apply`` of the wrapped optimizer: average gradients over ranks, then the update."""
    if trainable_variables is None:
        trainable_variables = self._trainable_variables
    variables = list(trainable_variables)
    dense = [tf.convert_to_tensor(g) if g is not None else tf.zeros(tuple(v.shape), tf.as_dtype(str(v.dtype)))
             for g, v in zip(grads, variables)]
    if hvd.size() > 1:
        dense = hvd.grouped_allreduce(dense, op=hvd.Average, name="hvd_ngd.averaging.grads")
    return super(type(self), self).apply(list(dense), variables)


def AveragingOptimizer(optimizer: Any) -> Any:
    """Wrap a Keras 3 optimizer so its gradients are averaged over Horovod ranks before the update.

    Args:
        optimizer: a Keras 3 optimizer.

    Returns:
        An optimizer of the same class (name and config).

    Raises:
        TypeError: not a Keras 3 optimizer (e.g. tf-keras).
    """
    require_keras_object(optimizer, keras.optimizers.Optimizer, "optimizer")
    if optimizer.gradient_accumulation_steps:
        raise ValueError("AveragingOptimizer averages every step's gradients: leave gradient_accumulation_steps None")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), {"apply": _apply, "__module__": __name__})
    return cls.from_config(optimizer.get_config())


__all__ = ["AveragingOptimizer"]
