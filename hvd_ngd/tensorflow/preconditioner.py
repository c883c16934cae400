"""``hvd_ngd.tensorflow.KFAC``: K-FAC / SP-NGD preconditioning for Keras models.

Usage in a custom loop (eager or inside ``tf.function``)::

    kfac = hvd_ngd.tensorflow.KFAC(model, reduce_gradients=True, strategy="spngd", lr=0.1)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = kfac.gradient(tape, loss, model.trainable_variables, lr=opt.learning_rate)
    opt.apply_gradients(zip(grads, model.trainable_variables))

With ``hvd.DistributedGradientTape`` the variables' gradients arrive averaged (KAISA strategies,
``reduce_gradients=False``); with a plain tape pass ``reduce_gradients=True`` (required for
``'spngd'``, which reduce-scatters gradients together with the curvature statistics).

What is traced and what runs eagerly: every forward call of a registered layer records its input
and pre-activation output (in a ``tf.function`` these are symbolic tensors of the traced graph;
all registered layers are captured on every step, the engine later uses only the statistics
that are due). ``gradient`` asks the tape for the variables' and the outputs' gradients in one
call (traced with the backward pass). The K-FAC step itself -- batch statistics, Horovod
collectives, decompositions, preconditioning, KL clipping and the stale-statistics schedule --
runs eagerly: directly when called eagerly, and inside one ``tf.py_function`` when traced, so
Python control flow on the step count works inside ``model.fit``'s compiled ``train_step``. A
``tf.py_function`` cannot be XLA-compiled: ``jit_compile=True`` is not supported.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf

from hvd_ngd import capture
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import check_consistent
from hvd_ngd.enums import LossReduction
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.registration import register_layers
from hvd_ngd.tensorflow.layers import KerasLayer, NormLayer, Record, make_layer
from hvd_ngd.tensorflow.ops import TFOps

LearningRate = Union[None, float, tf.Tensor, tf.Variable]
Scalar = Union[float, tf.Tensor, tf.Variable]
_Captured = List[Tuple[KerasLayer, Record]]


def optimizer_hyperparameters(optimizer: Any) -> Dict[str, Scalar]:
    """Numeric hyperparameters of a tf-keras optimizer, for the per-step rank-consistency check.

    Pass the result as ``KFAC.gradient(..., hyperparameters=...)``. It holds the public numeric
    attributes of tf-keras optimizers (``momentum``, ``beta_1``, ``epsilon``, ``ema_momentum``,
    ``weight_decay`` or ``clipnorm`` when set, ...) and, for legacy optimizers, the entries of
    their hyperparameter table (``momentum``, ``decay``, ``beta_1``, ...), as floats, tensors
    or variables, so it can be called inside a ``tf.function`` (e.g. ``model.fit``'s train
    step). The learning rate is left out: pass it as ``lr`` (compared as ``lr``).

    Args:
        optimizer: a tf-keras optimizer (new or legacy).

    Returns:
        Name -> value, the same names on every rank that builds the same optimizer.
    """
    items = [(k, v) for k, v in vars(optimizer).items() if not k.startswith("_")]
    hyper = getattr(optimizer, "_hyper", None)  # legacy OptimizerV2
    if isinstance(hyper, dict):
        items += list(hyper.items())
    out: Dict[str, Scalar] = {}
    for key, value in sorted(items, key=lambda item: item[0]):
        if key in ("learning_rate", "lr") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, (tf.Tensor, tf.Variable)) and value.shape.rank == 0:
            if value.dtype.is_floating or value.dtype.is_integer:
                out[key] = value
    return out


class KFAC:
    """Natural-gradient preconditioner for a Keras model.

    Registers Dense, Conv2D, Embedding (Kronecker-factored) and BatchNormalization /
    LayerNormalization (unit-wise) layers, including those of nested models; other layers keep
    their plain gradients. Construction runs one rank-consistency collective.

    Args:
        model: a built Keras model (every rank builds the same one).
        reduce_gradients: average gradients over ranks inside ``gradient`` (required by
            ``strategy='spngd'``; leave False with ``hvd.DistributedGradientTape``). Gradients
            of unregistered variables are then averaged too.
        communicator: injected collectives (defaults to ``horovod.tensorflow``).
        **config: ``hvd_ngd.KFACConfig`` fields (same names as the torch adapter).

    Raises:
        ValueError: bad configuration, unbuilt model, no supported layer, or ranks that disagree.
    """

    def __init__(
        self,
        model: Any,
        *,
        reduce_gradients: bool = False,
        communicator: Optional[Communicator] = None,
        **config: Any,
    ) -> None:
        self.config = KFACConfig(**config)
        self.config.require_gradient_reduction(
            reduce_gradients,
            "pass reduce_gradients=True with a plain tf.GradientTape (or use "
            "hvd_ngd.tensorflow.keras.DistributedOptimizer)",
        )
        if not getattr(model, "built", False):
            raise ValueError(f"model {model.name!r} is not built: call it once or give it an Input before KFAC")
        if communicator is None:
            from hvd_ngd.tensorflow.communicator import HorovodCommunicator

            communicator = HorovodCommunicator()
        self.comm = communicator
        self.ops = TFOps()
        self.reduce_gradients = reduce_gradients
        self.layers: List[KerasLayer]
        self.layers, self.skipped = register_layers(
            walk_layers(model),
            make_layer,
            self.config.skip_layers,
            adapter="hvd_ngd.tensorflow",
            supported="Dense, Conv2D, Embedding, BatchNormalization, LayerNormalization",
            model_name=repr(model.name),
        )
        specs = [layer.spec for layer in self.layers]
        check_consistent(self.comm, specs, self.config)
        self.engine = Preconditioner(specs, self.config, self.ops, self.comm)
        self.engine.register_groups()
        for layer in self.layers:
            layer.wrap()

    @property
    def steps(self) -> int:
        """Number of preconditioned steps so far."""
        return self.engine.steps

    # ------------------------------------------------------------------ gradient
    def gradient(
        self,
        tape: tf.GradientTape,
        loss: tf.Tensor,
        variables: Sequence[tf.Variable],
        *,
        lr: LearningRate = None,
        hyperparameters: Optional[Mapping[str, Scalar]] = None,
    ) -> List[tf.Tensor]:
        """Gradients of ``loss`` for ``variables``, preconditioned for the registered layers.

        Call it once per step, in place of ``tape.gradient``, on the tape that recorded the
        model's forward pass (a non-persistent tape can be used: one ``tape.gradient`` call is
        made). Gradients of other variables are returned plain (averaged when
        ``reduce_gradients``); ``None`` gradients become zeros; Embedding gradients are dense.

        Args:
            tape: the tape of the forward pass (``hvd.DistributedGradientTape`` for KAISA
                strategies with ``reduce_gradients=False``).
            loss: scalar loss (a mean over the local batch unless ``loss_reduction='sum'``).
            variables: the variables to differentiate, e.g. ``model.trainable_variables``.
            lr: current learning rate for KL clipping (float, tensor or variable); defaults to
                the configured ``lr``.
            hyperparameters: further values every rank must agree on at this step, e.g. the
                optimizer's ``{"momentum": opt.momentum}`` (floats, tensors or variables; the
                same names on every rank). They are compared across ranks together with the
                engine's own (``lr``, ``damping``, ...) every ``consistency_check_interval``
                steps, before any gradient is exchanged.

        Returns:
            One gradient per variable, in order.

        Raises:
            RuntimeError: when no forward pass of the registered layers was recorded (also for
                a second call after one forward pass), or a registered layer did not
                contribute to the loss.
            ValueError: for a ``hvd.DistributedGradientTape`` built with ``op=hvd.Adasum``.
            RankMismatchError: when ranks step with different hyperparameters (inside a
                ``tf.function`` it reaches the caller as ``tf.errors.InvalidArgumentError``
                carrying the same message).
        """
        _reject_adasum(tape)
        variables = list(variables)
        records = self._take_records()
        outputs = [z for _, (_, z) in records]
        all_grads = _tape_gradient(tape, loss, variables, outputs)
        var_grads, out_grads = list(all_grads[: len(variables)]), list(all_grads[len(variables) :])
        kept = [(r, g) for r, g in zip(records, out_grads) if g is not None]  # calls outside the loss
        if not kept:
            raise RuntimeError(
                "hvd_ngd: no recorded forward pass of the registered layers contributes to the loss: run the "
                "model inside the tape before gradient()"
            )
        records, out_grads = [r for r, _ in kept], [g for _, g in kept]
        contributing = {layer.name for layer, _ in records}
        silent = [layer.name for layer in self.layers if layer.name not in contributing]
        if silent:
            raise RuntimeError(
                f"hvd_ngd: registered layers {silent} did not contribute to the loss at step {self.steps} (no "
                "recorded forward call with a gradient): call them inside the tape on every step, or exclude "
                "them with skip_layers"
            )
        names = list(hyperparameters or {})
        if tf.executing_eagerly():
            if lr is not None:
                self.set_lr(lr)
            values = {n: _to_float(hyperparameters[n]) for n in names} if names else None
            return self.precondition(var_grads, variables, records, out_grads, hyperparameters=values)
        return self._precondition_in_graph(var_grads, variables, records, out_grads, lr, hyperparameters or {})

    def _take_records(self) -> _Captured:
        """This context's forward records of every layer (others: inference calls, other traces,
        are dropped); clears all records."""
        eager = tf.executing_eagerly()
        graph = None if eager else tf.compat.v1.get_default_graph()

        def current(z: Any) -> bool:
            return hasattr(z, "numpy") if eager else getattr(z, "graph", None) is graph

        records = [(layer, rec) for layer in self.layers for rec in layer.records if current(rec[1])]
        for layer in self.layers:
            layer.records.clear()
        if not records:
            raise RuntimeError("hvd_ngd: no forward pass was recorded: run the model inside the tape before gradient()")
        return records

    def _precondition_in_graph(
        self,
        var_grads: Sequence[Any],
        variables: Sequence[tf.Variable],
        records: _Captured,
        out_grads: List[tf.Tensor],
        lr: LearningRate,
        hyperparameters: Mapping[str, Scalar],
    ) -> List[tf.Tensor]:
        """Run ``precondition`` eagerly from inside a traced function (``tf.py_function``).

        ``lr`` and the ``hyperparameters`` values enter the function as float64 inputs, so
        their values at run time (not at trace time) are used and compared across ranks.
        """
        dense = [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v) for g, v in zip(var_grads, variables)]
        xs = [x for _, (x, _) in records]
        zs = [z for _, (_, z) in records]
        names = list(hyperparameters)
        scalars = ([] if lr is None else [lr]) + [hyperparameters[n] for n in names]
        extra = [tf.cast(tf.convert_to_tensor(v), tf.float64) for v in scalars]
        n_v, n_r, n_h = len(dense), len(records), len(names)

        def eager(*tensors: tf.Tensor) -> List[tf.Tensor]:
            grads = list(tensors[:n_v])
            xs_e, zs_e = tensors[n_v : n_v + n_r], tensors[n_v + n_r : n_v + 2 * n_r]
            gs_e = list(tensors[n_v + 2 * n_r : n_v + 3 * n_r])
            extra_e = tensors[n_v + 3 * n_r :]
            if lr is not None:
                self.set_lr(extra_e[0])
            values = {n: _to_float(v) for n, v in zip(names, extra_e[len(extra_e) - n_h :])} if n_h else None
            recs = [(layer, (x, z)) for (layer, _), x, z in zip(records, xs_e, zs_e)]
            pgrads = self.precondition(grads, variables, recs, gs_e, hyperparameters=values)
            return [tf.convert_to_tensor(g) for g in pgrads]

        out = tf.py_function(eager, inp=dense + xs + zs + out_grads + extra, Tout=[g.dtype for g in dense])
        for o, g in zip(out, dense):
            o.set_shape(g.shape)
        return list(out)

    def set_lr(self, lr: Any) -> None:
        """Set the learning rate KL clipping uses (eager value)."""
        self.engine.set_hyperparameters(lr=_to_float(lr))

    # ------------------------------------------------------------------ the eager step
    def precondition(
        self,
        grads: Sequence[Any],
        variables: Sequence[tf.Variable],
        records: _Captured,
        out_grads: Sequence[tf.Tensor],
        *,
        hyperparameters: Optional[Mapping[str, float]] = None,
    ) -> List[tf.Tensor]:
        """Feed the due statistics of eager records to the engine; return preconditioned grads.

        Args:
            grads: gradients of ``variables`` (local, or averaged by a Horovod tape).
            variables: the variables they belong to.
            records: (layer, (input, pre-activation output)) of this step's forward calls.
            out_grads: gradients of the loss w.r.t. each record's pre-activation output.
            hyperparameters: the caller's values to compare across ranks (see ``gradient``).
        """
        wanted = self.engine.capture_plan()
        mean = self.config.loss_reduction is LossReduction.MEAN
        for (layer, (x, z)), g in zip(records, out_grads):
            due = wanted.get(layer.name, set())
            scale = float(layer.batch_size(x)) if mean else 1.0
            if "A" in due:
                a = capture.a_statistic(self.ops, layer.spec, layer.a_input(x), like=z)
                self.engine.accumulate(layer.name, "A", a)
            if "G" in due:
                self.engine.accumulate(layer.name, "G", capture.g_statistic(self.ops, layer.spec, layer.g_output(g), scale))
            if "F" in due and isinstance(layer, NormLayer):
                f = capture.f_statistic(self.ops, layer.spec, layer.x_hat(z), layer.g_output(g), scale)
                self.engine.accumulate(layer.name, "F", f)
        index = {v.ref(): i for i, v in enumerate(variables)}
        grads = [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v) for g, v in zip(grads, variables)]
        missing = [layer.name for layer in self.layers if any(v.ref() not in index for v in layer.variables())]
        if missing:
            raise ValueError(f"hvd_ngd: gradient() needs the variables of every registered layer; missing: {missing}")
        covered = {v.ref() for layer in self.layers for v in layer.variables()}
        others = [i for i, v in enumerate(variables) if v.ref() not in covered]
        matrices = {
            layer.name: layer.grad_matrix([grads[index[v.ref()]] for v in layer.variables()]) for layer in self.layers
        }
        pgrads, other_out = self.engine.reduce_and_step(
            matrices, [grads[i] for i in others], self.reduce_gradients, hyperparameters
        )
        for layer in self.layers:
            for v, g in zip(layer.variables(), layer.split_matrix(pgrads[layer.name])):
                grads[index[v.ref()]] = g
        for i, g in zip(others, other_out):
            grads[i] = g
        return grads

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Running factors, inverses and schedule state as numpy (a collective: every rank calls it)."""
        return {"engine": self.engine.state_dict(), "config": self.config.describe()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict`` output (same layers and inverse method; any world size)."""
        self.engine.load_state_dict(state["engine"], like=None)

    def remove_hooks(self) -> None:
        """Restore the layers' original ``call`` methods (detach from the model)."""
        for layer in self.layers:
            layer.unwrap()


def _to_float(value: Scalar) -> float:
    """A Python float from a float, numpy scalar, eager tensor or variable."""
    return float(value.numpy()) if hasattr(value, "numpy") else float(value)


def _tape_reduce_op(tape: Any) -> Any:
    """The reduction ``op`` of a ``hvd.DistributedGradientTape`` (None for other tapes).

    Horovod does not store ``op`` on the tape; it lives in the closure of the tape's gradient
    reduction function (wrapped by a ``tf.function`` when the tape was built eagerly). None
    when that layout is not found.
    """
    fn = getattr(tape, "_allreduce_grads", None)
    fn = getattr(fn, "python_function", fn)
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure:
        return None
    cells = dict(zip(code.co_freevars, closure))
    try:
        return cells["op"].cell_contents if "op" in cells else None
    except ValueError:  # an empty cell
        return None


def _reject_adasum(tape: Any) -> None:
    """Raise for a Horovod tape that combines gradients with Adasum.

    Raises:
        ValueError: when ``tape`` is a ``hvd.DistributedGradientTape(..., op=hvd.Adasum)``.
    """
    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is None or getattr(tape, "_allreduce_grads", None) is None:
        return
    op = _tape_reduce_op(tape)
    if op is not None and op == getattr(hvd, "Adasum", object()):
        raise ValueError(
            "hvd_ngd does not support hvd.DistributedGradientTape(op=hvd.Adasum): Adasum combines the "
            "ranks' gradients by a scale-aware sum, not an average, so they are no longer the gradient of "
            "the averaged loss that the averaged curvature preconditions. Use op=hvd.Average (the default), "
            "or a plain tf.GradientTape with KFAC(..., reduce_gradients=True)"
        )


def _tape_gradient(
    tape: tf.GradientTape, loss: tf.Tensor, variables: List[tf.Variable], outputs: List[tf.Tensor]
) -> List[Any]:
    """One ``tape.gradient`` call for variables and outputs; output gradients stay local.

    A ``hvd.DistributedGradientTape`` averages the gradient of every source: the outputs are
    registered as local sources (public API) and Horovod's 1/size scaling of local sources is
    turned off for the call, so only the variables' gradients are averaged.
    """
    register = getattr(tape, "register_local_source", None)
    if register is None:
        return tape.gradient(loss, variables + outputs)
    for z in outputs:
        register(z)
    scale = getattr(tape, "scale_local_gradients", False)
    tape.scale_local_gradients = False
    try:
        return tape.gradient(loss, variables + outputs)
    finally:
        tape.scale_local_gradients = scale


def walk_layers(model: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(name, layer) of every leaf layer of a (possibly nested) Keras model, in order.

    Top-level layers keep their Keras names; layers of nested models are named
    ``outer/inner`` so that names stay unique.
    """
    out: List[Tuple[str, Any]] = []
    for layer in model.layers:
        name = f"{prefix}{layer.name}"
        if getattr(layer, "layers", None):
            out.extend(walk_layers(layer, prefix=f"{name}/"))
        else:
            out.append((name, layer))
    return out
