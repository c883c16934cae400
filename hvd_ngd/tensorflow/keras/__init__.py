"""Keras 3 integration: ``DistributedOptimizer`` makes ``model.fit`` train with K-FAC.

The one changed line of a Keras 3 script (``import keras``; the TensorFlow backend)::

    opt = hvd_ngd.tensorflow.keras.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model)
    model.compile(optimizer=opt, loss=...)
    model.fit(..., callbacks=[hvd_ngd.tensorflow.keras.callbacks.BroadcastGlobalVariablesCallback(0),
                              hvd_ngd.tensorflow.keras.callbacks.MetricAverageCallback()])

Written against Keras 3 and ``horovod.tensorflow`` (``horovod.tensorflow.keras`` does not work with
Keras 3). Keras 3's ``train_step`` differentiates the loss itself and hands the gradients to
``optimizer.apply_gradients`` -> ``apply``; the registered layers' output gradients were stored by
that same backward pass (``hvd_ngd.tensorflow.layers.Record``). The returned optimizer is a
dynamically created subclass of the user's optimizer class whose ``apply`` first replaces the
gradients by ``KFAC.precondition_gradients``' averaged, preconditioned ones, then applies them
with the class's own update rule. The optimizer's current learning rate (a variable, or a
schedule's value at the current iteration) is passed to every step for KL clipping, so
``LearningRateScheduler`` callbacks and schedules need nothing more; it and the optimizer's other
numeric settings (``momentum``, ...) enter the per-step rank-consistency check. hvd_ngd averages
every gradient itself (every strategy): do not also average them with Horovod.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from hvd_ngd.communicator import Communicator
from hvd_ngd.tensorflow.keras_version import require_keras, require_keras_object
from hvd_ngd.tensorflow.preconditioner import KFAC, optimizer_hyperparameters

keras = require_keras()


def current_learning_rate(optimizer: Any) -> Any:
    """The learning rate a Keras 3 ``optimizer`` applies at its current iteration (tensor or variable)."""
    return optimizer.learning_rate


def _apply(self: Any, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]] = None) -> Any:
    """``apply`` of the wrapped optimizer: K-FAC-preconditioned, averaged gradients, then the update."""
    if trainable_variables is None:
        if not self.built:
            raise ValueError("hvd_ngd's optimizer needs the variables with the gradients (or build() it first)")
        trainable_variables = self._trainable_variables
    variables = list(trainable_variables)
    grads = self.kfac.precondition_gradients(
        list(grads), variables, lr=current_learning_rate(self), hyperparameters=optimizer_hyperparameters(self)
    )
    return super(type(self), self).apply(grads, variables)


def _reject_unsupported(optimizer: Any) -> None:
    """Raise for Keras 3 optimizer settings under which K-FAC would train wrongly.

    Raises:
        TypeError: a ``LossScaleOptimizer`` (mixed-precision loss scaling).
        ValueError: ``loss_scale_factor`` or ``gradient_accumulation_steps`` set.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise TypeError(
            "hvd_ngd.tensorflow.keras.DistributedOptimizer does not support LossScaleOptimizer: loss scaling "
            "scales the captured output gradients (the G factors) too. Train in float32 (or bfloat16 without "
            "loss scaling) and wrap the inner optimizer"
        )
    if optimizer.loss_scale_factor is not None:
        raise ValueError(
            f"loss_scale_factor={optimizer.loss_scale_factor!r} is not supported by hvd_ngd (it scales the "
            "captured output gradients, i.e. the G factors): leave it None"
        )
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps!r} is not supported by hvd_ngd "
            "(K-FAC preconditions and averages every step's gradients): leave it None and use a larger batch"
        )


def DistributedOptimizer(optimizer: Any, model: Any, communicator: Optional[Communicator] = None, **config: Any) -> Any:
    """Wrap a Keras 3 optimizer so ``apply`` / ``apply_gradients`` (hence ``model.fit``) use K-FAC.

    Args:
        optimizer: a Keras 3 optimizer (``keras.optimizers.SGD`` with momentum is the papers'
            choice; any ``keras.optimizers.Optimizer`` subclass works: its update rule runs on the
            preconditioned gradients).
        model: the built Keras 3 model to precondition; its supported layers are registered now.
        communicator: injected collectives (defaults to horovod.tensorflow).
        **config: ``hvd_ngd.KFACConfig`` fields; ``strategy`` defaults to ``'spngd'``, ``lr``
            to the optimizer's current learning rate (it follows the optimizer afterwards).

    Returns:
        An optimizer of the same class (name and config), whose ``kfac`` attribute is the
        preconditioner (``hvd_ngd.tensorflow.KFAC`` with ``reduce_gradients=True``).

    Raises:
        TypeError: ``optimizer`` is not a Keras 3 optimizer (a tf-keras / legacy optimizer, or a
            ``LossScaleOptimizer``), or ``model`` is not a Keras 3 model.
        ValueError: unsupported optimizer settings (``loss_scale_factor``,
            ``gradient_accumulation_steps``), or as ``KFAC``.
    """
    require_keras_object(optimizer, keras.optimizers.Optimizer, "optimizer")
    _reject_unsupported(optimizer)
    config.setdefault("strategy", "spngd")
    if "lr" not in config:
        config["lr"] = float(keras.ops.convert_to_numpy(current_learning_rate(optimizer)))
    kfac = KFAC(model, reduce_gradients=True, communicator=communicator, **config)
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), {"apply": _apply, "__module__": __name__})
    wrapped = cls.from_config(optimizer.get_config())
    wrapped.kfac = kfac
    return wrapped


__all__ = ["DistributedOptimizer", "current_learning_rate"]
