"""The K-FAC step compiled into the caller's graph for steps with nothing due.

Inside a traced train step (``model.fit``, or a custom loop in ``tf.function``) every step
chooses, in the graph, between two paths:

- **frozen** (``hvd_ngd.engine.frozen.frozen_step`` traced with TF ops and Horovod's graph
  collectives): the curvature operands live in ``tf.Variable``s; the step averages,
  preconditions, KL-clips and checks health and rank agreement with no Python at run time;
- **eager**: the engine's full step inside one ``tf.py_function`` (refreshes, faults, the
  consistency error with its message).

The frozen path is taken while ``remaining`` > 0. Every eager step first accounts for the frozen
steps taken since the last one (``catch_up``) and ends with ``sync``: the ranks agree (one small
allgather) on how many of the next steps have nothing due, and the operands that changed are
written to their variables. A frozen step whose health scalar is not 0 (non-finite gradients on
some rank, ranks that disagree, a non-finite preconditioned gradient) discards its result and
runs the eager step on the same gradients, so faults and errors behave exactly as before.
Changing hyperparameters, loading a checkpoint or an eager step outside the graph sets
``remaining`` to 0 (``invalidate``): the next step is eager and re-syncs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from hvd_ngd.engine import frozen
from hvd_ngd.engine.frozen import FrozenPlan

LIMIT = 1000  # at most this many frozen steps are granted at one sync


class GraphStep:
    """Frozen-step variables and the in-graph choice between the frozen and eager paths.

    Args:
        engine: the adapter's ``Preconditioner``.
        plan: ``frozen_plan`` output for this world.
        dtype: dtype of the operand variables (the model's gradient dtype).
    """

    def __init__(self, engine: Any, plan: FrozenPlan, dtype: tf.DType) -> None:
        self.engine = engine
        self.plan = plan
        self.comm = engine.comm
        self.ops = engine.ops
        with tf.init_scope():
            self.remaining = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvd_ngd_frozen_remaining")
            self.pending = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvd_ngd_frozen_pending")
            self.base_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="hvd_ngd_frozen_base_step")
            self.lr = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="hvd_ngd_frozen_lr")
            self.kl_clip = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="hvd_ngd_frozen_kl_clip")
            self.hyper = tf.Variable(frozen.check_values(engine), dtype=tf.float64, trainable=False, name="hvd_ngd_frozen_hyper")
            self.operands: Dict[str, List[tf.Variable]] = {
                n: [
                    tf.Variable(tf.zeros(shape, dtype=dtype), trainable=False, name=f"hvd_ngd_frozen_{i}")
                    for i, shape in enumerate(engine.blocks[n].operand_shapes())
                ]
                for n in plan.local
            }
        self._sources: Dict[str, Tuple[Any, ...]] = {}
        self.bytes_per_step = 0
        self.frozen_steps = 0  # taken so far (accounted at catch_up)
        self.traced = False

    # ------------------------------------------------------------------ eager side
    def catch_up(self) -> None:
        """Account in the engine for the frozen steps taken since the last eager step."""
        if not self.traced:
            return
        n = int(self.pending.numpy())
        if n:
            frozen.catch_up(self.engine, n)
            lr = float(self.lr.numpy())
            if lr != self.engine.schedule.values.lr:
                self.engine.schedule.set(lr=lr)
            self.pending.assign(0)
            self.frozen_steps += n
            if hasattr(self.comm, "bytes_sent"):
                self.comm.bytes_sent += n * self.bytes_per_step

    def sync(self) -> None:
        """After an eager step: grant the next frozen steps (the same number on every rank) and
        write the operands that changed. A collective when the world has more than one rank."""
        if not self.traced:
            return
        engine = self.engine
        steady = frozen.steady_steps(engine, self.plan, LIMIT)
        if self.plan.world > 1:
            counts = self.comm.allgather(tf.constant([float(steady)], tf.float64), name=f"hvd_ngd.frozen.steady.s{engine.steps}")
            steady = int(tf.reduce_min(counts).numpy())
        if steady > 0:
            for name, values in frozen.frozen_operands(engine, self.plan).items():
                previous = self._sources.get(name)
                if previous is not None and all(_same(a, b) for a, b in zip(previous, values)):
                    continue
                for variable, value in zip(self.operands[name], values):
                    # a Python number goes straight to the variable's dtype (tf.cast would
                    # round it through float32)
                    variable.assign(tf.cast(value, variable.dtype) if tf.is_tensor(value) else tf.constant(value, variable.dtype))
                self._sources[name] = tuple(values)
            values = engine.schedule.values
            self.hyper.assign(frozen.check_values(engine))
            self.lr.assign(float(values.lr))
            self.kl_clip.assign(math.inf if values.kl_clip is None else float(values.kl_clip))
            self.base_step.assign(engine.steps)
        self.remaining.assign(steady)

    def invalidate(self) -> None:
        """Make the next step eager (its ``sync`` re-reads the engine)."""
        if self.traced:
            self.remaining.assign(0)

    # ------------------------------------------------------------------ graph side
    def step(
        self,
        matrices: Sequence[tf.Tensor],
        others: Sequence[tf.Tensor],
        lr: Optional[tf.Tensor],
        extras: Sequence[tf.Tensor],
        eager: Callable[[], List[tf.Tensor]],
    ) -> List[tf.Tensor]:
        """The step's preconditioned matrices and other gradients, in the graph being traced.

        Args:
            matrices: gradient matrices in engine layer order.
            others: gradients of unregistered variables.
            lr: the optimizer's learning rate (None: the engine's scheduled value).
            extras: further float64 scalars every rank must agree on (the optimizer's).
            eager: builds the eager path (the ``tf.py_function``) with the same outputs.
        """
        plan, engine = self.plan, self.engine
        self.traced = True

        def frozen_path() -> List[tf.Tensor]:
            lr64 = self.lr.read_value() if lr is None else tf.cast(lr, tf.float64)
            step = tf.cast(self.base_step + self.pending, tf.float64)
            check = tf.concat([tf.stack([step, lr64]), self.hyper.read_value()] + [tf.reshape(e, (1,)) for e in extras], 0)
            operands = {n: [v.read_value() for v in vs] for n, vs in self.operands.items()}
            sent = getattr(self.comm, "bytes_sent", 0)
            pgrads, other_out, bad = frozen.frozen_step(
                self.ops, self.comm, plan, engine.blocks, operands, list(matrices), list(others), lr64,
                self.kl_clip.read_value(), check,
            )
            if hasattr(self.comm, "bytes_sent"):  # counted per step at catch_up, not at trace time
                self.bytes_per_step = self.comm.bytes_sent - sent
                self.comm.bytes_sent = sent

            def accept() -> List[tf.Tensor]:
                updates = [self.remaining.assign_sub(1), self.pending.assign_add(1)]
                if lr is not None:  # the engine's scheduled lr follows the optimizer's (catch_up)
                    updates.append(self.lr.assign(lr64))
                with tf.control_dependencies(updates):
                    return [tf.identity(t) for t in list(pgrads) + list(other_out)]

            return tf.cond(tf.equal(bad, 0.0), accept, eager)

        return tf.cond(self.remaining > 0, frozen_path, eager)


def _same(a: Any, b: Any) -> bool:
    """The same operand: the same tensor object, or an equal Python number."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return a is b


def build(engine: Any, reduce_gradients: bool, dtype: tf.DType) -> Tuple[Optional[GraphStep], str]:
    """A ``GraphStep`` for the engine, or None with the reason the world cannot take frozen steps.

    Any world size: the frozen step's collectives are Horovod graph ops, matched across ranks by
    their explicit names (``HorovodCommunicator`` passes ``ignore_name_scope=True``).
    """
    shapes = {n: engine.specs[n].grad_shape for n in engine.layer_order}
    plan, reason = frozen.frozen_plan(engine, reduce_gradients, shapes)
    if plan is None:
        return None, reason
    return GraphStep(engine, plan, dtype), ""
