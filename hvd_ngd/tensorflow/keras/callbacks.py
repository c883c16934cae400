"""Keras 3 callbacks for ``model.fit`` with hvd_ngd (Keras 3 + horovod.tensorflow).

- ``BroadcastGlobalVariablesCallback``: rank 0's model and optimizer variables to every rank
  before the first step (Horovod's fails on Keras 3 variables: no ``ref()``).

- ``KFACScheduleCallback``: per-epoch schedules of damping, factor decay, KL clip and the
  factor / inverse update intervals (the learning rate needs none: the optimizer's current rate
  reaches the preconditioner at every step, so ``LearningRateScheduler`` and schedules work).
- ``KFACCheckpointCallback`` and ``load_kfac_state``: the preconditioner's running factors,
  inverses and stale-statistics state, which Keras' ``ModelCheckpoint`` does not see.
- ``MetricAverageCallback``: the epoch's logs averaged over ranks with named
  ``horovod.tensorflow`` allreduces (Horovod's lives in the Keras 3-incompatible
  ``horovod.tensorflow.keras``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.tensorflow.keras_version import require_keras
from hvd_ngd.tensorflow.preconditioner import KFAC

keras = require_keras()
Schedule = Callable[[int], Any]


def kfac_of(model: Any) -> KFAC:
    """The ``hvd_ngd.tensorflow.KFAC`` behind a compiled model's optimizer.

    Raises:
        ValueError: the model's optimizer is not ``hvd_ngd.tensorflow.keras.DistributedOptimizer``.
    """
    kfac = getattr(getattr(model, "optimizer", None), "kfac", None)
    if not isinstance(kfac, KFAC):
        raise ValueError(
            "this callback needs a model compiled with hvd_ngd.tensorflow.keras.DistributedOptimizer "
            f"(got optimizer {type(getattr(model, 'optimizer', None)).__name__})"
        )
    return kfac


class KFACScheduleCallback(keras.callbacks.Callback):
    """Set K-FAC hyperparameters at the start of every epoch from per-epoch schedules.

    Example (the papers decay damping during training)::

        KFACScheduleCallback(damping=lambda epoch: 1e-2 * 0.5 ** (epoch // 10),
                             inv_update_interval=lambda epoch: 10 if epoch < 5 else 100)

    Every rank must run the same schedule (the per-step consistency check names a rank that
    does not). The values in effect are added to the epoch's logs as ``kfac_<name>``.

    Args:
        **schedules: ``name=callable(epoch) -> value`` for ``damping``, ``factor_decay``,
            ``kl_clip``, ``factor_update_interval`` or ``inv_update_interval`` (epochs from 0).

    Raises:
        ValueError: an unknown name, ``lr`` (use the optimizer's schedule), or a non-callable.
    """

    def __init__(self, **schedules: Schedule) -> None:
        super().__init__()
        allowed = [n for n in Preconditioner.SCHEDULABLE if n != "lr"]
        if "lr" in schedules:
            raise ValueError("schedule the learning rate on the Keras optimizer (a schedule or LearningRateScheduler)")
        unknown = sorted(set(schedules) - set(allowed))
        if unknown:
            raise ValueError(f"cannot schedule {unknown}: KFACScheduleCallback schedules {allowed}")
        if not schedules:
            raise ValueError(f"KFACScheduleCallback needs at least one schedule of {allowed}")
        for name, schedule in schedules.items():
            if not callable(schedule):
                raise ValueError(f"schedule {name}={schedule!r} must be a callable epoch -> value")
        self.schedules: Dict[str, Schedule] = dict(schedules)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        values = {name: schedule(epoch) for name, schedule in self.schedules.items()}
        kfac_of(self.model).engine.set_hyperparameters(**values)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is None:
            return
        config = kfac_of(self.model).engine.schedule.values
        for name in self.schedules:
            value = getattr(config, name)
            logs[f"kfac_{name}"] = float("nan") if value is None else float(value)


class KFACCheckpointCallback(keras.callbacks.Callback):
    """Save the preconditioner's state (``KFAC.state_dict``) at the end of epochs.

    ``state_dict`` is a collective (factors live on their owner ranks): every rank runs this
    callback; rank 0 writes the file. Pair it with Keras' ``ModelCheckpoint`` on rank 0 for the
    weights and the optimizer's slots, and resume with ``load_kfac_state`` after the model and
    optimizer are restored.

    Args:
        filepath: file to write; ``{epoch}`` (1-based, as in ``ModelCheckpoint``) is formatted.
        every: save every this many epochs (>= 1).

    Raises:
        ValueError: ``every`` < 1.
    """

    def __init__(self, filepath: Union[str, Path], every: int = 1) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every={every!r}: must be an int >= 1")
        self.filepath = str(filepath)
        self.every = every

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if (epoch + 1) % self.every:
            return
        kfac = kfac_of(self.model)
        state = kfac.state_dict()  # collective: every rank
        if kfac.comm.rank == 0:
            path = Path(self.filepath.format(epoch=epoch + 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(pickle.dumps(state))
            tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint


def load_kfac_state(filepath: Union[str, Path], target: Any) -> None:
    """Load a ``KFACCheckpointCallback`` file into a preconditioner, on any number of ranks.

    Args:
        filepath: the written file (every rank reads it: use a shared file system, or copy it).
        target: ``hvd_ngd.tensorflow.KFAC``, its Keras ``DistributedOptimizer``, or a model
            compiled with one.
    """
    kfac = target if isinstance(target, KFAC) else getattr(target, "kfac", None)
    if kfac is None:
        kfac = kfac_of(target)
    kfac.load_state_dict(pickle.loads(Path(filepath).read_bytes()))


def broadcast_variables(variables: Any, root_rank: int, name: str) -> None:
    """Assign ``root_rank``'s value of every (Keras 3 or TF) variable on every rank, eagerly.

    Args:
        variables: the variables, in the same order on every rank.
        root_rank: the rank whose values win.
        name: prefix of the collectives' names (one named broadcast per variable).
    """
    for i, v in enumerate(variables):
        v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank, name=f"{name}.{i}"))


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Start every rank from ``root_rank``'s weights and optimizer state (Keras 3).

    At the start of training it builds the optimizer if needed (its slots exist before the first
    step) and broadcasts ``model.variables`` (weights, BatchNorm moving statistics, ...) and the
    optimizer's variables, so that ranks that drew different initial weights train identically.
    Horovod's ``horovod.tensorflow.keras.callbacks.BroadcastGlobalVariablesCallback`` does not
    work with Keras 3 variables.

    Args:
        root_rank: the rank whose values are broadcast (0 in the usual recipe).
    """

    def __init__(self, root_rank: int = 0) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.broadcast_done = False

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self.broadcast_done:
            return
        broadcast_variables(self.model.variables, self.root_rank, "hvd_ngd.broadcast.model")
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            broadcast_variables(optimizer.variables, self.root_rank, "hvd_ngd.broadcast.optimizer")
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Average the epoch's logs (losses, metrics, ``val_*``) over all ranks, in place.

    Put it before callbacks that read the logs (checkpointing, early stopping, TensorBoard) so
    that every rank sees, and acts on, the same values.
    """

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if not logs:
            return
        for metric in sorted(logs):  # the same order on every rank
            value = logs[metric]
            if not np.isscalar(value) and np.ndim(value) != 0:
                continue
            tensor = tf.constant(float(value), dtype=tf.float64)
            logs[metric] = float(hvd.allreduce(tensor, op=hvd.Average, name=f"hvd_ngd.metric_average.{metric}").numpy())


__all__ = ["BroadcastGlobalVariablesCallback", "KFACCheckpointCallback", "KFACScheduleCallback", "MetricAverageCallback", "kfac_of", "broadcast_variables", "load_kfac_state"]
