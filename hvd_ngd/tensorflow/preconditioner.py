"""``hvd_ngd.tensorflow.KFAC``: K-FAC / SP-NGD preconditioning in TensorFlow custom loops.

The forward pass records each supported layer's input and pre-activation output;
``gradient(tape, loss, variables)`` asks the tape for the variables' gradients and the output
gradients together, feeds the due statistics to the core engine and returns the preconditioned
gradients. Eagerly this runs as Python; inside a ``tf.function`` the forward and backward passes
are traced and the K-FAC step (statistics, Horovod collectives, inversions, schedule decisions)
runs eagerly inside one ``tf.py_function``, so step-dependent Python control flow keeps working.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List, Optional, Sequence

import tensorflow as tf

from hvd_ngd import capture
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import check_consistent
from hvd_ngd.enums import LossReduction, Strategy
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.tensorflow.layers import KerasLayer, NormLayer, make_layer
from hvd_ngd.tensorflow.ops import TFOps


class KFAC:
    """Natural-gradient preconditioner for a Keras model in a custom training loop.

    Args:
        model: a built Keras model.
        reduce_gradients: average gradients over ranks here (required by ``strategy='spngd'``;
            leave False with ``hvd.DistributedGradientTape``).
        communicator: injected collectives (defaults to horovod.tensorflow).
        **config: ``hvd_ngd.KFACConfig`` fields.
    """

    def __init__(self, model: Any, *, reduce_gradients: bool = False, communicator: Optional[Communicator] = None, **config: Any) -> None:
        self.config = KFACConfig(**config)
        if self.config.strategy is Strategy.SPNGD and not reduce_gradients:
            raise ValueError("strategy='spngd' reduce-scatters gradients itself: pass reduce_gradients=True and a plain tape")
        if communicator is None:
            from hvd_ngd.tensorflow.communicator import HorovodCommunicator

            communicator = HorovodCommunicator()
        self.comm = communicator
        self.ops = TFOps()
        self.reduce_gradients = reduce_gradients
        patterns = [re.compile(p) for p in self.config.skip_layers]
        self.layers: List[KerasLayer] = []
        self.skipped: Dict[str, str] = {}
        for layer in _walk(model):
            registered, reason = make_layer(layer.name, layer)
            if registered is None:
                if reason:
                    self.skipped[layer.name] = reason
                    warnings.warn(f"hvd_ngd: not preconditioning {layer.name!r} ({type(layer).__name__}): {reason}")
                continue
            if any(p.search(layer.name) or p.search(type(layer).__name__) for p in patterns):
                self.skipped[layer.name] = "matched skip_layers"
                continue
            registered.wrap()
            self.layers.append(registered)
        if not self.layers:
            raise ValueError(f"hvd_ngd.tensorflow.KFAC found no supported layer in {model.name}; skipped: {self.skipped}")
        specs = [layer.spec for layer in self.layers]
        check_consistent(self.comm, specs, self.config)
        self.engine = Preconditioner(specs, self.config, self.ops, self.comm)
        register = getattr(self.comm, "register_groups", None)
        if register is not None:
            register(list(self.engine.worker_groups) + list(self.engine.receiver_groups))

    def gradient(self, tape: tf.GradientTape, loss: tf.Tensor, variables: Sequence[tf.Variable]) -> List[tf.Tensor]:
        """Gradients of ``loss`` for ``variables``, preconditioned for the registered layers."""
        eager = tf.executing_eagerly()
        graph = None if eager else tf.compat.v1.get_default_graph()
        # Keep this forward pass's records: drop those of other traced graphs (or symbolic ones
        # when eager), left by inference calls.
        records = [
            (layer, rec)
            for layer in self.layers
            for rec in layer.records
            if (eager and hasattr(rec[1], "numpy")) or (not eager and getattr(rec[1], "graph", None) is graph)
        ]
        if not records:
            raise RuntimeError("hvd_ngd: no forward pass was recorded: run the model inside the tape before gradient()")
        outputs = [z for _, (_, z) in records]
        all_grads = tape.gradient(loss, list(variables) + outputs)
        var_grads, out_grads = all_grads[: len(variables)], all_grads[len(variables) :]
        for layer in self.layers:
            layer.records.clear()
        kept = [(r, g) for r, g in zip(records, out_grads) if g is not None]  # e.g. eager inference calls
        records, out_grads = [r for r, _ in kept], [g for _, g in kept]
        if eager:
            return self.precondition(var_grads, variables, records, out_grads)
        return self._precondition_in_graph(var_grads, variables, records, out_grads)

    def _precondition_in_graph(self, var_grads: Sequence[Any], variables: Sequence[tf.Variable], records: List, out_grads: List) -> List[tf.Tensor]:
        """Run ``precondition`` eagerly from inside a traced function."""
        dense = [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v) for g, v in zip(var_grads, variables)]
        if any(g is None for g in out_grads):
            missing = [layer.name for (layer, _), g in zip(records, out_grads) if g is None]
            raise RuntimeError(f"layers {missing} did not contribute to the loss: exclude them with skip_layers")
        xs = [x for _, (x, _) in records]
        zs = [z for _, (_, z) in records]
        n_v, n_r = len(dense), len(records)

        def eager(*tensors: tf.Tensor) -> List[tf.Tensor]:
            grads = list(tensors[:n_v])
            xs_e, zs_e, gs_e = tensors[n_v : n_v + n_r], tensors[n_v + n_r : n_v + 2 * n_r], tensors[n_v + 2 * n_r :]
            recs = [(layer, (x, z)) for (layer, _), x, z in zip(records, xs_e, zs_e)]
            return [tf.convert_to_tensor(g) for g in self.precondition(grads, variables, recs, list(gs_e))]

        out = tf.py_function(eager, inp=dense + xs + zs + list(out_grads), Tout=[g.dtype for g in dense])
        for o, g in zip(out, dense):
            o.set_shape(g.shape)
        return out

    def precondition(self, grads: Sequence[Any], variables: Sequence[tf.Variable], records: List, out_grads: List) -> List[tf.Tensor]:
        """Feed captured statistics to the engine and return preconditioned gradients."""
        wanted = self.engine.capture_plan()
        for (layer, (x, z)), g in zip(records, out_grads):
            due = wanted.get(layer.name, set())
            if g is None:
                raise RuntimeError(f"layer {layer.name!r} did not contribute to the loss: exclude it with skip_layers")
            batch = float(x.shape[0]) if self.config.loss_reduction is LossReduction.MEAN else 1.0
            if "A" in due:
                self.engine.accumulate(layer.name, "A", capture.a_statistic(self.ops, layer.spec, layer.a_input(x), like=z))
            if "G" in due:
                self.engine.accumulate(layer.name, "G", capture.g_statistic(self.ops, layer.spec, layer.g_output(g), batch))
            if "F" in due and isinstance(layer, NormLayer):
                self.engine.accumulate(layer.name, "F", capture.f_statistic(self.ops, layer.spec, layer.x_hat(z), layer.g_output(g), batch))
        index = {v.ref(): i for i, v in enumerate(variables)}
        grads = [tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v) for g, v in zip(grads, variables)]
        covered = {v.ref() for layer in self.layers for v in layer.variables()}
        others = [i for i, v in enumerate(variables) if v.ref() not in covered]
        matrices = {layer.name: layer.grad_matrix([grads[index[v.ref()]] for v in layer.variables()]) for layer in self.layers}
        other_grads = [grads[i] for i in others]
        pgrads, other_out = self.engine.reduce_and_step(matrices, other_grads, self.reduce_gradients)
        for layer in self.layers:
            for v, g in zip(layer.variables(), layer.split_matrix(pgrads[layer.name])):
                grads[index[v.ref()]] = g
        for i, g in zip(others, other_out):
            grads[i] = g
        return grads


def _walk(model: Any) -> List[Any]:
    """All leaf layers of a (possibly nested) Keras model, in order."""
    out: List[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_walk(layer))
        else:
            out.append(layer)
    return out
