"""``hvd_ngd.tensorflow.KFAC``: K-FAC / SP-NGD preconditioning for Keras 3 models.

Usage in a custom loop (eager or inside ``tf.function``)::

    kfac = hvd_ngd.tensorflow.KFAC(model, reduce_gradients=True, strategy="spngd", lr=0.1)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = kfac.gradient(tape, loss, model.trainable_variables, lr=opt.learning_rate)
    opt.apply_gradients(zip(grads, model.trainable_variables))

With ``hvd.DistributedGradientTape`` the variables' gradients arrive averaged (KAISA strategies,
``reduce_gradients=False``); with a plain tape pass ``reduce_gradients=True`` (required for
``'spngd'``, which reduce-scatters gradients together with the curvature statistics).
``hvd_ngd.tensorflow.keras.DistributedOptimizer`` calls ``precondition_gradients`` from the
optimizer's ``apply`` with the gradients ``model.fit``'s ``train_step`` computed.

What is traced and what runs eagerly: every training forward call of a registered layer records
its input and pre-activation output, and the tape's backward pass stores the output's gradient
in the record (``hvd_ngd.tensorflow.layers.Record``); in a ``tf.function`` these are symbolic
tensors of the traced graph (all registered layers are captured on every step, the engine later
uses only the statistics that are due). The K-FAC step itself -- batch statistics, Horovod
collectives, decompositions, preconditioning, KL clipping and the stale-statistics schedule --
runs eagerly: directly when called eagerly, and inside one ``tf.py_function`` when traced, so
Python control flow on the step count works inside ``model.fit``'s compiled ``train_step``. A
``tf.py_function`` cannot be XLA-compiled: registered layers report ``supports_jit=False``, so
Keras compiles the step without XLA.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf

from hvd_ngd import capture
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import check_consistent
from hvd_ngd.enums import FisherType, LossReduction
from hvd_ngd.adapter import EngineAPI
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.registration import register_layers
from hvd_ngd.tensorflow.graph_step import GraphStep
from hvd_ngd.tensorflow.graph_step import build as build_graph_step
from hvd_ngd.tensorflow.keras_version import require_keras, require_keras_object
from hvd_ngd.tensorflow.layers import KerasLayer, NormLayer, Record, make_layer
from hvd_ngd.tensorflow.ops import TFOps

keras = require_keras()
LearningRate = Union[None, float, tf.Tensor, tf.Variable, Any]
Scalar = Union[float, tf.Tensor, tf.Variable, Any]
_Captured = List[Tuple[KerasLayer, Record]]


def _is_scalar_number(value: Any) -> bool:
    """A scalar float/int tensor or (TF or Keras 3) variable."""
    if isinstance(value, keras.Variable):
        return len(value.shape) == 0 and ("float" in str(value.dtype) or "int" in str(value.dtype))
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value.shape.rank == 0 and (value.dtype.is_floating or value.dtype.is_integer)
    return False


def optimizer_hyperparameters(optimizer: Any) -> Dict[str, Scalar]:
    """Numeric hyperparameters of a Keras 3 optimizer, for the per-step rank-consistency check.

    Pass the result as ``KFAC.gradient(..., hyperparameters=...)``. It holds the public numeric
    attributes (``momentum``, ``beta_1``, ``epsilon``, ``ema_momentum``, ``weight_decay`` or
    ``clipnorm`` when set, ...) as floats, tensors or variables, so it can be called inside a
    ``tf.function`` (e.g. ``model.fit``'s train step). The learning rate is left out: pass it
    as ``lr`` (compared as ``lr``).

    Args:
        optimizer: a Keras 3 optimizer.

    Returns:
        Name -> value, the same names on every rank that builds the same optimizer.
    """
    out: Dict[str, Scalar] = {}
    for key, value in sorted(vars(optimizer).items(), key=lambda item: item[0]):
        if key.startswith("_") or key in ("learning_rate", "lr") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif _is_scalar_number(value):
            out[key] = value
    return out


class KFAC(EngineAPI):
    """Natural-gradient preconditioner for a Keras 3 model.

    Registers Dense, Conv2D, Embedding (Kronecker-factored) and BatchNormalization /
    LayerNormalization (unit-wise) layers, including those of nested models and layers; other
    layers with weights keep their plain gradients (a warning names each with the reason).
    Construction runs one rank-consistency collective.

    Args:
        model: a built Keras 3 model (every rank builds the same one).
        reduce_gradients: average gradients over ranks inside ``gradient`` (required by
            ``strategy='spngd'``; leave False with ``hvd.DistributedGradientTape``). Gradients
            of unregistered variables are then averaged too.
        communicator: injected collectives (defaults to ``horovod.tensorflow``).
        graph_step: in a traced train step, take steps with nothing due in the graph
            (``hvd_ngd.tensorflow.graph_step``); False runs every step's K-FAC work eagerly
            in a ``tf.py_function``. ``graph_step_reason`` says why a world has no graph step.
        **config: ``hvd_ngd.KFACConfig`` fields (same names as the torch adapter).

    Raises:
        TypeError: a tf-keras (Keras 2) or non-Keras model.
        ValueError: bad configuration, unbuilt model, no supported layer, or ranks that disagree.
    """

    def __init__(
        self,
        model: Any,
        *,
        reduce_gradients: bool = False,
        communicator: Optional[Communicator] = None,
        graph_step: bool = True,
        **config: Any,
    ) -> None:
        require_keras_object(model, keras.layers.Layer, "model")
        self.config = KFACConfig(**config)
        if self.config.fisher_type is FisherType.MONTE_CARLO:
            raise ValueError(
                "fisher_type='mc' is not implemented in hvd_ngd.tensorflow yet (the sampled-label backward "
                "pass exists in hvd_ngd.torch only): use fisher_type='empirical'"
            )
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
        self.graph: Optional[GraphStep] = None
        self.graph_step_reason = "graph_step=False"
        if graph_step:
            dtype = tf.as_dtype(str(self.layers[0].variables()[0].dtype))
            self.graph, self.graph_step_reason = build_graph_step(self.engine, reduce_gradients, dtype)
        for layer in self.layers:
            layer.wrap()

    # ------------------------------------------------------------------ engine access
    def _settle(self) -> None:
        """Account for steps taken in the graph (eager callers only)."""
        if self.graph is not None and tf.executing_eagerly():
            self.graph.catch_up()

    @property
    def steps(self) -> int:
        """Number of preconditioned steps so far (graph steps included)."""
        self._settle()
        return self.engine.steps

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        """The current scheduled hyperparameters (the last graph step's lr included)."""
        self._settle()
        return self.engine.scheduled_hyperparameters()

    @property
    def statistics_counts(self) -> Any:
        """Statistic and inverse computations done and skipped so far (graph steps included)."""
        self._settle()
        return self.engine.tracker.counts

    def set_hyperparameters(self, **values: Any) -> None:
        """See ``hvd_ngd.adapter.EngineAPI.set_hyperparameters`` (the next step runs eagerly)."""
        self._settle()
        self.engine.set_hyperparameters(**values)
        if self.graph is not None:
            self.graph.invalidate()

    def _skipped(self, pgrads: Dict[str, Any], other_out: List[Any]) -> Tuple[Dict[str, Any], List[Any]]:
        """Zero gradients for a step every rank skips (some rank's gradients were not finite)."""
        if not self.engine.last_step_skipped:
            return pgrads, other_out
        return {k: tf.zeros_like(v) for k, v in pgrads.items()}, [tf.zeros_like(g) for g in other_out]

    # ------------------------------------------------------------------ gradient
    def gradient(
        self,
        tape: tf.GradientTape,
        loss: tf.Tensor,
        variables: Sequence[Any],
        *,
        lr: LearningRate = None,
        hyperparameters: Optional[Mapping[str, Scalar]] = None,
    ) -> List[tf.Tensor]:
        """Gradients of ``loss`` for ``variables``, preconditioned for the registered layers.

        Call it once per step, in place of ``tape.gradient``, on the tape that recorded the
        model's forward pass (one ``tape.gradient`` call is made: a non-persistent tape works).
        Gradients of other variables are returned plain (averaged when ``reduce_gradients``);
        ``None`` gradients become zeros; Embedding gradients are dense.

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
        if not any(self._current(rec.output) for layer in self.layers for rec in layer.records):
            raise RuntimeError("hvd_ngd: no forward pass was recorded: run the model inside the tape before gradient()")
        # fills the records' output gradients; TF variables as sources: Horovod's tape needs .ref()
        var_grads = tape.gradient(loss, [_tf_variable(v) for v in variables])
        return self.precondition_gradients(var_grads, variables, lr=lr, hyperparameters=hyperparameters)

    def precondition_gradients(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        *,
        lr: LearningRate = None,
        hyperparameters: Optional[Mapping[str, Scalar]] = None,
    ) -> List[tf.Tensor]:
        """Precondition gradients the caller computed with the tape of this step's forward pass.

        The tape's backward pass has filled in the records' output gradients; they and the
        records are consumed here (``gradient`` and the Keras optimizer's ``apply`` call this).

        Args:
            grads: gradients of ``variables`` from the tape (local, or averaged by a Horovod tape).
            variables: the variables they belong to.
            lr, hyperparameters: as in ``gradient``.

        Returns:
            One gradient per variable, in order.

        Raises:
            RuntimeError, RankMismatchError: as in ``gradient``.
        """
        variables = list(variables)
        records = self._take_records()
        kept = [(layer, rec) for layer, rec in records if rec.grad is not None and self._current(rec.grad)]
        if not kept:
            raise RuntimeError(
                "hvd_ngd: no recorded forward pass of the registered layers contributes to the loss: run the "
                "model inside the tape before gradient() (or model.fit)"
            )
        contributing = {layer.name for layer, _ in kept}
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
            return self.precondition(grads, variables, kept, hyperparameters=values)
        return self._precondition_in_graph(grads, variables, kept, lr, hyperparameters or {})

    @staticmethod
    def _current(t: Any) -> bool:
        """Whether tensor ``t`` belongs to the current context (eager, or the graph being traced)."""
        if tf.executing_eagerly():
            return hasattr(t, "numpy")
        return getattr(t, "graph", None) is tf.compat.v1.get_default_graph()

    def _take_records(self) -> _Captured:
        """This context's forward records of every layer (others: inference calls, other traces,
        are dropped); clears all records."""
        records = [(layer, rec) for layer in self.layers for rec in layer.records if self._current(rec.output)]
        for layer in self.layers:
            layer.records.clear()
        if not records:
            raise RuntimeError("hvd_ngd: no forward pass was recorded: run the model inside the tape before gradient()")
        return records

    def _precondition_in_graph(
        self,
        var_grads: Sequence[Any],
        variables: Sequence[Any],
        records: _Captured,
        lr: LearningRate,
        hyperparameters: Mapping[str, Scalar],
    ) -> List[tf.Tensor]:
        """Run the engine's step eagerly from inside a traced function (``tf.py_function``).

        The layout work stays in the graph: the gradient matrices are built before the
        ``tf.py_function`` and split back into per-variable gradients after it; inside run the
        statistics of the due factors and the engine's step. ``lr`` and the ``hyperparameters``
        values enter as float64 inputs, so their values at run time (not at trace time) are
        used and compared across ranks.
        """
        grads, index, others = self._gradient_layout(var_grads, variables)
        matrices = [layer.grad_matrix([grads[index[id(v)]] for v in layer.variables()]) for layer in self.layers]
        other_grads = [grads[i] for i in others]
        xs = [rec.inputs for _, rec in records]
        zs = [rec.output for _, rec in records]
        gs = [rec.grad for _, rec in records]
        names = list(hyperparameters)
        scalars = ([] if lr is None else [lr]) + [hyperparameters[n] for n in names]
        extra = [tf.cast(tf.convert_to_tensor(v), tf.float64) for v in scalars]
        n_m, n_o, n_r, n_h = len(matrices), len(other_grads), len(records), len(names)

        graph = self.graph if self._graph_ready(matrices) else None

        def eager(*tensors: tf.Tensor) -> List[tf.Tensor]:
            if graph is not None:
                graph.catch_up()
            mats, rest = tensors[:n_m], tensors[n_m + n_o :]
            xs_e, zs_e, gs_e, extra_e = rest[:n_r], rest[n_r : 2 * n_r], rest[2 * n_r : 3 * n_r], rest[3 * n_r :]
            if lr is not None:
                self.set_lr(extra_e[0])
            values = {n: _to_float(v) for n, v in zip(names, extra_e[len(extra_e) - n_h :])} if n_h else None
            self._accumulate_statistics([(layer, Record(x, z, g)) for (layer, _), x, z, g in zip(records, xs_e, zs_e, gs_e)])
            pgrads, other_out = self.engine.reduce_and_step(
                {layer.name: m for layer, m in zip(self.layers, mats)}, list(tensors[n_m : n_m + n_o]),
                self.reduce_gradients, values,
            )
            pgrads, other_out = self._skipped(pgrads, list(other_out))
            if graph is not None:
                graph.sync()
            return [tf.convert_to_tensor(pgrads[layer.name]) for layer in self.layers] + [
                tf.convert_to_tensor(g) for g in other_out
            ]

        inputs = matrices + other_grads + xs + zs + gs + extra

        def eager_path() -> List[tf.Tensor]:
            out = tf.py_function(eager, inp=inputs, Tout=[t.dtype for t in matrices + other_grads])
            for o, t in zip(out, matrices + other_grads):
                o.set_shape(t.shape)
            return list(out)

        if graph is None:
            out = eager_path()
        else:
            lr64 = extra[0] if lr is not None else None
            out = graph.step(matrices, other_grads, lr64, extra[len(extra) - n_h :] if n_h else [], eager_path)
        return self._assemble(grads, index, others, list(out[:n_m]), list(out[n_m:]))

    def _graph_ready(self, matrices: Sequence[tf.Tensor]) -> bool:
        """Whether this trace can take graph steps (the matrices have the planned shapes)."""
        if self.graph is None:
            return False
        plan = self.graph.plan
        return all(tuple(m.shape) == plan.shapes[layer.name] for layer, m in zip(self.layers, matrices))

    def set_lr(self, lr: Any) -> None:
        """Set the learning rate KL clipping uses (eager value)."""
        self.engine.set_hyperparameters(lr=_to_float(lr))

    # ------------------------------------------------------------------ the eager step
    def precondition(
        self,
        grads: Sequence[Any],
        variables: Sequence[Any],
        records: _Captured,
        *,
        hyperparameters: Optional[Mapping[str, float]] = None,
    ) -> List[tf.Tensor]:
        """Feed the due statistics of eager records to the engine; return preconditioned grads.

        Args:
            grads: gradients of ``variables`` (local, or averaged by a Horovod tape).
            variables: the variables they belong to.
            records: (layer, record) of this step's forward calls, output gradients filled in.
            hyperparameters: the caller's values to compare across ranks (see ``gradient``).
        """
        if self.graph is not None:
            self.graph.catch_up()
            self.graph.invalidate()  # this eager step may refresh what the graph holds
        self._accumulate_statistics(records)
        grads, index, others = self._gradient_layout(grads, variables)
        matrices = {
            layer.name: layer.grad_matrix([grads[index[id(v)]] for v in layer.variables()]) for layer in self.layers
        }
        pgrads, other_out = self.engine.reduce_and_step(
            matrices, [grads[i] for i in others], self.reduce_gradients, hyperparameters
        )
        pgrads, other_out = self._skipped(pgrads, list(other_out))
        return self._assemble(grads, index, others, [pgrads[layer.name] for layer in self.layers], other_out)

    def _accumulate_statistics(self, records: _Captured) -> None:
        """Hand the engine this step's due statistics (A, G, unit-wise F) of eager records."""
        wanted = self.engine.capture_plan()
        mean = self.config.loss_reduction is LossReduction.MEAN
        for layer, rec in records:
            x, z, g = rec.inputs, rec.output, rec.grad
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

    def _gradient_layout(
        self, grads: Sequence[Any], variables: Sequence[Any]
    ) -> Tuple[List[tf.Tensor], Dict[int, int], List[int]]:
        """Dense gradients, variable id -> position, and positions of unregistered variables.

        Raises:
            ValueError: a registered layer's variable is not among ``variables``.
        """
        index = {id(v): i for i, v in enumerate(variables)}
        dense = [_dense(g, v) for g, v in zip(grads, variables)]
        missing = [layer.name for layer in self.layers if any(id(v) not in index for v in layer.variables())]
        if missing:
            raise ValueError(f"hvd_ngd: gradient() needs the variables of every registered layer; missing: {missing}")
        covered = {id(v) for layer in self.layers for v in layer.variables()}
        return dense, index, [i for i, v in enumerate(variables) if id(v) not in covered]

    def _assemble(
        self, grads: List[Any], index: Dict[int, int], others: List[int], pgrads: List[Any], other_out: Sequence[Any]
    ) -> List[tf.Tensor]:
        """Per-variable gradients from the layers' preconditioned matrices and the other gradients."""
        out = list(grads)
        for layer, mat in zip(self.layers, pgrads):
            for v, g in zip(layer.variables(), layer.split_matrix(mat)):
                out[index[id(v)]] = g
        for i, g in zip(others, other_out):
            out[i] = g
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Running factors, inverses and schedule state as numpy (a collective: every rank calls it)."""
        self._settle()
        return {"engine": self.engine.state_dict(), "config": self.config.describe()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict`` output (same layers and inverse method; any world size)."""
        self._settle()
        self.engine.load_state_dict(state["engine"], like=None)
        if self.graph is not None:
            self.graph.invalidate()

    def remove_hooks(self) -> None:
        """Restore the layers' original ``call`` methods (detach from the model)."""
        for layer in self.layers:
            layer.unwrap()


def _tf_variable(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (itself for anything else)."""
    inner = getattr(v, "_value", None) if isinstance(v, keras.Variable) else None
    return inner if isinstance(inner, tf.Variable) else v


def _dense(g: Any, v: Any) -> tf.Tensor:
    """A dense tensor gradient (IndexedSlices densified, None -> zeros like the variable)."""
    return tf.convert_to_tensor(g) if g is not None else tf.zeros(tuple(v.shape), dtype=tf.as_dtype(str(v.dtype)))


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


def _sublayers(layer: Any) -> List[Any]:
    """Direct sublayers of a Keras 3 model or layer (a Model's ``layers``, else tracked layers)."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def walk_layers(model: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(name, layer) of every leaf layer of a (possibly nested) Keras model, in order.

    Top-level layers keep their Keras names; layers of nested models and of layers built from
    sublayers (custom blocks, ``MultiHeadAttention``) are named ``outer/inner`` so that names
    stay unique.
    """
    out: List[Tuple[str, Any]] = []
    for layer in _sublayers(model):
        name = f"{prefix}{layer.name}"
        if _sublayers(layer):
            out.extend(walk_layers(layer, prefix=f"{name}/"))
        else:
            out.append((name, layer))
    return out
