"""``hvd_ngd.torch.KFAC``: K-FAC / SP-NGD preconditioning of a torch model's gradients."""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from hvd_ngd import capture
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import check_consistent
from hvd_ngd.enums import LossReduction
from hvd_ngd.registration import register_layers
from hvd_ngd.stale import StalenessCounts
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.torch.layers import TorchLayer, make_layer
from hvd_ngd.torch.ops import TorchOps


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Numeric hyperparameters of every param group (``lr``, ``momentum``, ``weight_decay``, ...),
    named ``group{i}.{key}``, for the per-step rank-consistency check."""
    out: Dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        for key in sorted(group):
            value = group[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"group{i}.{key}"] = float(value)
            elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                out.update({f"group{i}.{key}{j}": float(v) for j, v in enumerate(value)})
            elif torch.is_tensor(value) and value.numel() == 1:
                out[f"group{i}.{key}"] = float(value)
    return out


class KFAC:
    """Natural-gradient preconditioner for a torch model in a Horovod job.

    The canonical Horovod pattern::

        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        kfac = hvd_ngd.torch.KFAC(model, lr=0.1, damping=1e-3)
        loss.backward()
        optimizer.synchronize()
        kfac.step()
        with optimizer.skip_synchronize():
            optimizer.step()

    ``step()`` replaces each registered layer's ``.grad`` by its preconditioned gradient.
    Under ``horovodrun`` elastic (``HOROVOD_ELASTIC=1``) construction communicates nothing: the
    rank-consistency check and process-set registration run at ``connect()`` (called by
    ``hvd_ngd.torch.elastic.KFACState``'s sync and by the first ``step()``).

    Args:
        model: the model; supported modules (Linear, Conv2d, BatchNorm1d/2d, SyncBatchNorm,
            LayerNorm, Embedding) are registered, everything else keeps its plain gradient.
        reduce_gradients: average gradients over ranks inside ``step()`` (required by
            ``strategy='spngd'``, which reduce-scatters them; set it when the optimizer is not
            a ``hvd.DistributedOptimizer``). With it, gradients of unregistered parameters are
            averaged too.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from captured output
            gradients (call ``scaler.unscale_(optimizer)`` before ``step()``).
        communicator: injected collectives (defaults to Horovod's).
        **config: ``hvd_ngd.KFACConfig`` fields.

    Raises:
        ValueError: bad configuration, no supported layer, or ranks that disagree.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduce_gradients: bool = False,
        grad_scaler: Any = None,
        communicator: Optional[Communicator] = None,
        **config: Any,
    ) -> None:
        self.config = KFACConfig(**config)
        self.config.require_gradient_reduction(
            reduce_gradients,
            "use hvd_ngd.torch.DistributedOptimizer, or KFAC(..., reduce_gradients=True) with a plain "
            "(non-Horovod) optimizer",
        )
        self.model = model
        self.reduce_gradients = reduce_gradients
        self.grad_scaler = grad_scaler
        communicator_is_default = communicator is None
        if communicator is None:
            from hvd_ngd.torch.communicator import HorovodCommunicator

            communicator = HorovodCommunicator()
        self.comm = communicator
        self.ops = TorchOps()
        self.layers: List[TorchLayer]
        self.layers, self.skipped = register_layers(
            ((name or "root", module) for name, module in model.named_modules()),
            make_layer,
            self.config.skip_layers,
            adapter="hvd_ngd.torch",
            supported="Linear, Conv2d, BatchNorm1d/2d, LayerNorm, Embedding",
            model_name=type(model).__name__,
        )
        # Under ``horovodrun`` elastic nothing may communicate before ``hvd.elastic.run``: a worker
        # that joins a running job builds its model while the others synchronise state. The
        # collective part of the setup then runs at the state's sync (or the first step).
        deferred = communicator_is_default and os.environ.get("HOROVOD_ELASTIC") == "1"
        if not deferred:  # before the engine: a config that fails on one rank must not hang the others
            check_consistent(self.comm, [layer.spec for layer in self.layers], self.config)
        self.rebuild()
        if not deferred:
            self.engine.register_groups()
            self._connected = True
        covered = {id(p) for layer in self.layers for p in layer.params()}
        self.other_params = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        self._handles = [
            layer.module.register_forward_hook(functools.partial(self._forward_hook, layer)) for layer in self.layers
        ]

    # ------------------------------------------------------------------ world (elastic)
    def rebuild(self) -> None:
        """Build a fresh engine for the communicator's current world size and rank.

        For Horovod elastic: after a reset (``hvd.shutdown(); hvd.init()`` with another world
        size or rank) the layer-to-rank plan and the worker groups are recomputed and the cached
        process sets are forgotten. Local (no collective), so it may run in a reset callback.
        The running state (factors, inverses, step count) starts empty: load a ``state_dict``
        afterwards (``hvd_ngd.torch.elastic.KFACState`` does). The collective part of the setup
        (rank-consistency check, process-set registration) is left to ``connect()``, which the
        next ``step()`` calls.
        """
        reset = getattr(self.comm, "reset", None)
        if reset is not None:
            reset()
        self.engine = Preconditioner([layer.spec for layer in self.layers], self.config, self.ops, self.comm)
        self._connected = False
        self._backward_seen = False
        self._marker_armed = False

    def connect(self) -> None:
        """Run the collective part of the setup once per engine: compare layers and config across
        ranks and register the engine's process sets. Every rank must call it (``step()`` does).

        Raises:
            RankMismatchError: ranks registered different layers or configurations.
            RuntimeError: a process set is needed but dynamic process sets are off.
        """
        if self._connected:
            return
        check_consistent(self.comm, [layer.spec for layer in self.layers], self.config)
        self.engine.register_groups()
        self._connected = True

    def abandon_step(self) -> None:
        """Drop the statistics captured since the last ``step()`` (e.g. a step interrupted by an
        elastic reset between ``loss.backward()`` and ``step()``); local."""
        self._backward_seen = False
        self._marker_armed = False
        self.engine.discard_step()

    def is_current(self) -> bool:
        """Whether the engine was planned for the communicator's current world size and rank."""
        return self.engine.world == self.comm.size and self.engine.rank == self.comm.rank

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, layer: TorchLayer, module: nn.Module, inputs: Sequence[Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or not torch.is_tensor(output):
            return
        wanted = self.engine.capture_plan().get(layer.name, set())
        x = inputs[0]
        batch = layer.batch_size(x)
        if "A" in wanted:
            with torch.no_grad():
                a = capture.a_statistic(self.ops, layer.spec, layer.a_input(x.detach()), like=module.weight)
            self.engine.accumulate(layer.name, "A", a)
        if not output.requires_grad:
            return
        if "G" in wanted or "F" in wanted:
            x_hat = layer.x_hat(output) if "F" in wanted else None
            output.register_hook(functools.partial(self._output_grad_hook, layer, wanted, batch, x_hat))
        elif not self._marker_armed or layer is self.layers[0]:
            # nothing to capture: one hook per forward pass notes the backward pass
            self._marker_armed = True
            output.register_hook(self._backward_marker)

    def _backward_marker(self, grad: torch.Tensor) -> None:
        self._backward_seen = True

    def _output_grad_hook(
        self, layer: TorchLayer, wanted: set, batch: int, x_hat: Optional[torch.Tensor], grad: torch.Tensor
    ) -> None:
        self._backward_seen = True
        scale = float(batch) if self.config.loss_reduction is LossReduction.MEAN else 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale /= float(self.grad_scaler.get_scale())
        with torch.no_grad():
            g = layer.g_output(grad.detach())
            if "G" in wanted:
                self.engine.accumulate(layer.name, "G", capture.g_statistic(self.ops, layer.spec, g, scale))
            if "F" in wanted:
                self.engine.accumulate(layer.name, "F", capture.f_statistic(self.ops, layer.spec, x_hat, g, scale))

    # ------------------------------------------------------------------ step
    def step(self, lr: Optional[float] = None, hyperparameters: Optional[Mapping[str, float]] = None) -> bool:
        """Precondition the registered layers' gradients in place.

        Returns True, or False when the step was skipped because some rank's gradients were not
        finite (``skip_nonfinite_steps``, on by default): then every parameter's ``.grad`` is
        set to None on every rank, so a following ``optimizer.step()`` changes nothing, and the
        step's statistics are dropped (``kfac.skipped_steps`` counts such steps).

        Args:
            lr: current learning rate for KL clipping (defaults to the configured ``lr``).
            hyperparameters: further values every rank must agree on at this step (the
                optimizer's, e.g. ``optimizer_hyperparameters(optimizer)``); compared across
                ranks with the engine's own every ``consistency_check_interval`` steps.

        Raises:
            RuntimeError: when no backward pass ran since the last ``step()`` (called before
                ``loss.backward()``, or twice for one backward).
            RankMismatchError: when ranks step with different hyperparameters.
            RuntimeError: the world size or rank changed since the engine was planned (Horovod
                elastic without ``hvd_ngd.torch.elastic.KFACState``).
        """
        if not self._backward_seen:
            raise RuntimeError(
                "hvd_ngd: KFAC.step() was called without a backward pass since the last step(): call "
                "loss.backward() (and optimizer.synchronize()) first, and step() once per optimizer step"
            )
        if not self.is_current():
            raise RuntimeError(
                f"hvd_ngd: the world changed (engine planned for rank {self.engine.rank} of {self.engine.world}, "
                f"now rank {self.comm.rank} of {self.comm.size}): under Horovod elastic use "
                "hvd_ngd.torch.elastic.KFACState, or call kfac.rebuild() and load a state_dict"
            )
        self.connect()
        grads = {layer.name: layer.grad_matrix() for layer in self.layers}
        others: List[torch.Tensor] = []
        if self.reduce_gradients:
            for p in self.other_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                others.append(p.grad)
        pgrads, others_out = self.engine.reduce_and_step(
            grads, others, self.reduce_gradients, hyperparameters, lr=None if lr is None else float(lr)
        )
        if self.engine.last_step_skipped:
            # Some rank's gradients were not finite: drop every gradient, so that the optimizer's
            # step() leaves the parameters (and its momentum) alone on every rank.
            for p in self.model.parameters():
                p.grad = None
            self._backward_seen = False
            self._marker_armed = False
            return False
        with torch.no_grad():
            for layer in self.layers:
                layer.set_grad_matrix(pgrads[layer.name])
            for p, g in zip(self.other_params if self.reduce_gradients else [], others_out):
                if g is not p.grad:
                    p.grad.copy_(g)
        self._backward_seen = False
        self._marker_armed = False
        return True

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because some rank's gradients were not finite."""
        return self.engine.skipped_steps

    @property
    def steps(self) -> int:
        """Number of preconditioned steps so far."""
        return self.engine.steps

    def set_hyperparameters(self, **values: Any) -> None:
        """Change ``lr``, ``damping``, ``factor_decay``, ``kl_clip``, ``factor_update_interval``
        or ``inv_update_interval`` between steps (a schedule); every rank must do the same.

        Raises:
            ValueError: an unknown or unschedulable name, or an invalid value (named).
        """
        self.engine.set_hyperparameters(**values)

    @property
    def hyperparameters(self) -> Dict[str, Any]:
        """The current scheduled hyperparameters."""
        return self.engine.scheduled_hyperparameters()

    @property
    def statistics_counts(self) -> StalenessCounts:
        """Statistic and inverse computations done and skipped so far (stale statistics)."""
        return self.engine.tracker.counts

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The complete K-FAC state, gathered from every rank (a collective: call it on every
        rank); loads on any world size and strategy-compatible configuration."""
        return {"engine": self.engine.state_dict(), "config": self.config.describe()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict`` output (same layers and inverse method; any world size)."""
        like = next(iter(self.layers)).module.weight
        self.engine.load_state_dict(state["engine"], like=like)

    def remove_hooks(self) -> None:
        """Detach from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
