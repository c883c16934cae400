"""Keras integration: ``DistributedOptimizer`` makes ``model.fit`` train with K-FAC.

Drop-in for ``horovod.tensorflow.keras.DistributedOptimizer``::

    opt = hvd_ngd.tensorflow.keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1, momentum=0.9), model)
    model.compile(optimizer=opt, loss=...)
    model.fit(..., callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                              hvd_ngd.tensorflow.keras.callbacks.MetricAverageCallback()])

Like Horovod's, it is a dynamically created subclass of the user's optimizer class that overrides
gradient computation: ``compute_gradients`` (tf-keras optimizers) or ``_get_gradients`` (legacy
optimizers) receive the tape ``model.fit``'s ``train_step`` recorded and return
``KFAC.gradient``'s averaged, preconditioned gradients. The K-FAC step runs eagerly through one
``tf.py_function`` inside the compiled train step (``jit_compile=True`` is not supported). The
optimizer's current learning rate (a variable, a schedule's value at the current iteration, or a
legacy optimizer's decayed rate) is passed to every step for KL clipping, so
``LearningRateScheduler`` callbacks and schedules need nothing more; it and the optimizer's
other numeric settings (``momentum``, ...) enter the per-step rank-consistency check. hvd_ngd averages gradients
itself (every strategy), so do not also wrap the optimizer with Horovod's. Use tf-keras
(``TF_USE_LEGACY_KERAS=1``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import tensorflow as tf

from hvd_ngd.communicator import Communicator
from hvd_ngd.tensorflow.preconditioner import KFAC, optimizer_hyperparameters

keras = tf.keras


def current_learning_rate(optimizer: Any) -> Any:
    """The learning rate ``optimizer`` applies at its current iteration (tensor or variable)."""
    legacy_decayed = getattr(optimizer, "_decayed_lr", None)
    if legacy_decayed is not None:  # legacy OptimizerV2: hyper-parameter or schedule
        return legacy_decayed(tf.float32)
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return schedule(optimizer.iterations)
    return optimizer.learning_rate


def _compute_gradients(self: Any, loss: Any, var_list: Any, tape: Any = None) -> List[Tuple[Any, Any]]:
    """``compute_gradients`` of tf-keras optimizers: K-FAC-preconditioned, averaged gradients."""
    if tape is None and not callable(loss):
        raise ValueError("hvd_ngd's Keras optimizer needs the GradientTape of a Tensor loss (model.fit passes it)")
    tape = tf.GradientTape() if tape is None else tape
    if callable(loss):
        with tape:
            if not callable(var_list):
                tape.watch(var_list)
            loss = loss()
            if callable(var_list):
                var_list = var_list()
    variables = list(var_list() if callable(var_list) else var_list)
    grads = self.kfac.gradient(
        tape, loss, variables, lr=current_learning_rate(self), hyperparameters=optimizer_hyperparameters(self)
    )
    return list(zip(grads, variables))


def _get_gradients(self: Any, tape: Any, loss: Any, var_list: Any, grad_loss: Any = None) -> List[Tuple[Any, Any]]:
    """``_get_gradients`` of legacy optimizers (called by ``minimize`` with the tape)."""
    if grad_loss is not None:
        raise NotImplementedError("hvd_ngd's Keras optimizer does not support grad_loss")
    variables = list(var_list)
    grads = self.kfac.gradient(
        tape, loss, variables, lr=current_learning_rate(self), hyperparameters=optimizer_hyperparameters(self)
    )
    return list(zip(grads, variables))


def _get_gradients_v1(self: Any, loss: Any, params: Any) -> Any:
    raise NotImplementedError("hvd_ngd's Keras optimizer needs TF2 execution with a GradientTape (model.fit in TF2)")


def DistributedOptimizer(optimizer: Any, model: Any, communicator: Optional[Communicator] = None, **config: Any) -> Any:
    """Wrap a tf-keras optimizer so ``minimize`` (hence ``model.fit``) uses K-FAC.

    Args:
        optimizer: a tf-keras optimizer, new or legacy (SGD with momentum is the papers' choice).
        model: the built model to precondition; its supported layers are registered now.
        communicator: injected collectives (defaults to horovod.tensorflow).
        **config: ``hvd_ngd.KFACConfig`` fields; ``strategy`` defaults to ``'spngd'``, ``lr``
            to the optimizer's current learning rate (it follows the optimizer afterwards).

    Returns:
        An optimizer of the same class (name and config), whose ``kfac`` attribute is the
        preconditioner (``hvd_ngd.tensorflow.KFAC`` with ``reduce_gradients=True``).

    Raises:
        TypeError: when ``optimizer`` is not a tf-keras optimizer (e.g. a Keras 3 one).
        ValueError: as ``KFAC``.
    """
    legacy = isinstance(optimizer, keras.optimizers.legacy.Optimizer)
    if not (legacy or isinstance(optimizer, keras.optimizers.Optimizer)):
        raise TypeError(
            f"hvd_ngd.tensorflow.keras.DistributedOptimizer needs a tf-keras optimizer, got {type(optimizer)!r} "
            "(set TF_USE_LEGACY_KERAS=1 before importing tensorflow)"
        )
    config.setdefault("strategy", "spngd")
    if "lr" not in config:
        config["lr"] = float(tf.convert_to_tensor(current_learning_rate(optimizer)).numpy())
    kfac = KFAC(model, reduce_gradients=True, communicator=communicator, **config)
    if legacy:
        members = {"_get_gradients": _get_gradients, "get_gradients": _get_gradients_v1}
    else:
        members = {"compute_gradients": _compute_gradients}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), members)
    wrapped = cls.from_config(optimizer.get_config())
    wrapped.kfac = kfac
    return wrapped


__all__ = ["DistributedOptimizer", "current_learning_rate"]
