"""``hvd_ngd.torch.KFAC``: K-FAC / SP-NGD preconditioning of a torch model's gradients."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn

from hvd_ngd import capture
from hvd_ngd.communicator import Communicator
from hvd_ngd.config import KFACConfig
from hvd_ngd.consistency import check_consistent
from hvd_ngd.enums import FisherType, LossReduction
from hvd_ngd.registration import register_layers
from hvd_ngd.adapter import EngineAPI
from hvd_ngd.preconditioner import Preconditioner
from hvd_ngd.torch import amp, fisher
from hvd_ngd.torch.layers import TorchLayer, functional_submodules, make_layer
from hvd_ngd.torch.ops import TorchOps

SUPPORTED = (
    "Linear, Conv1d/Conv2d (groups: one block per group), Embedding, BatchNorm1d/2d/3d, SyncBatchNorm, "
    "GroupNorm, InstanceNorm (affine), LayerNorm"
)


def guard_module_hooks() -> None:
    """Make ``torch.compile`` guard on ``nn.Module`` hooks (off by default in torch 2.x:
    ``torch._dynamo.config.skip_nnmodule_hook_guards``), so a compiled graph traced before
    KFAC's hooks existed, or for another instance of the same model class, is not reused
    without them; it only adds guards."""
    try:
        import torch._dynamo
    except ImportError:  # pragma: no cover - torch without Dynamo
        return
    if getattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False):
        torch._dynamo.config.skip_nnmodule_hook_guards = False


def eager_hook(fn: Any) -> Any:
    """``fn`` excluded from ``torch.compile`` tracing: each call is a graph break, and the hook
    runs as plain Python on real tensors (see docs/layers.md, torch.compile). Outside tracing
    the hook is called directly: Dynamo's disable wrapper costs tens of microseconds a call."""
    disabled = torch.compiler.disable(fn, recursive=True)

    @functools.wraps(fn)
    def hook(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


@dataclasses.dataclass
class _PendingOutput:
    """A layer output whose G (or unit-wise F) comes from the Monte-Carlo backward pass."""

    layer: TorchLayer
    wanted: Set[str]
    batch: int
    x_hat: Optional[torch.Tensor]
    output: torch.Tensor


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


class KFAC(EngineAPI):
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
        model: the model; supported modules (``SUPPORTED``; docs/layers.md has the table) are
            registered, everything else keeps its plain gradient (a warning names the reason for
            known layers that are skipped, e.g. ``nn.MultiheadAttention``).
        reduce_gradients: average gradients over ranks inside ``step()`` (required by
            ``strategy='spngd'``, which reduce-scatters them; set it when the optimizer is not
            a ``hvd.DistributedOptimizer``). With it, gradients of unregistered parameters are
            averaged too.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from captured output
            gradients (call ``scaler.unscale_(optimizer)`` before ``step()``); a step whose
            gradients overflowed is skipped (statistics discarded, ``last_step_skipped``).
        mc_sampler: with ``fisher_type='mc'``, ``sampler(output) -> targets`` replacing the
            default draw from ``loss_family`` (e.g. for a seeded generator:
            ``hvd_ngd.torch.fisher.default_sampler(family, generator)``).
        communicator: injected collectives (defaults to Horovod's).
        **config: ``hvd_ngd.KFACConfig`` fields.

    Monte-Carlo Fisher (``fisher_type='mc', loss_family='cross_entropy' | 'mse'``): a forward
    hook on ``model`` takes its output (a tensor: logits with classes last, or predictions) and,
    at steps where a G or unit-wise F statistic is due, draws labels from it and backpropagates
    the sampled loss (``torch.autograd.grad`` w.r.t. the registered layers' outputs, with
    ``retain_graph=True``) to capture G; the user's ``loss.backward()`` is unchanged and gives
    the applied (true-label) gradient. A model whose output is not a tensor calls
    ``kfac.sample_fisher(logits)`` after its forward instead.

    Raises:
        ValueError: bad configuration, no supported layer, or ranks that disagree.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduce_gradients: bool = False,
        grad_scaler: Any = None,
        mc_sampler: Optional[fisher.Sampler] = None,
        communicator: Optional[Communicator] = None,
        **config: Any,
    ) -> None:
        self.config = KFACConfig(**config)
        self.mc = self.config.fisher_type is FisherType.MONTE_CARLO
        if mc_sampler is not None and not self.mc:
            raise ValueError("mc_sampler is only used with fisher_type='mc'")
        self.mc_sampler: Optional[fisher.Sampler] = (
            (mc_sampler or fisher.default_sampler(self.config.loss_family)) if self.mc else None
        )
        self._mc_pending: List[_PendingOutput] = []
        self._in_mc_pass = False
        self.mc_passes = 0  # Monte-Carlo backward passes run so far
        self.last_step_skipped = False
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
        functional = functional_submodules(model)

        def make(name: str, module: nn.Module):
            if id(module) in functional:  # covered by the parent's warning
                return None, None
            return make_layer(name, module)

        self.layers: List[TorchLayer]
        self.layers, self.skipped = register_layers(
            ((name or "root", module) for name, module in model.named_modules()),
            make,
            self.config.skip_layers,
            adapter="hvd_ngd.torch",
            supported=SUPPORTED,
            model_name=type(model).__name__,
        )
        for name, module in model.named_modules():
            if id(module) in functional and name not in self.skipped:
                self.skipped[name] = f"weight used functionally by {functional[id(module)]!r} (see its warning)"
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
        # The hooks run eagerly under torch.compile (``eager_hook``): they read and update the
        # engine's Python state, which a traced graph would bake in or recompile on. Graphs compiled
        # from now on guard on module hooks, so a graph traced without (or with another model's)
        # hooks is not reused for this model.
        guard_module_hooks()
        self._handles = [
            layer.module.register_forward_hook(eager_hook(functools.partial(self._forward_hook, layer)))
            for layer in self.layers
        ]
        # A gradient reaching a registered weight without KFAC's output hooks firing means the hooks
        # were bypassed (a compiled graph traced before they existed): step() says so.
        self._handles.append(self.layers[0].module.weight.register_post_accumulate_grad_hook(self._grad_accumulated))
        if self.mc:  # after the layers' hooks, so a registered root module has captured its output first
            self._handles.append(model.register_forward_hook(eager_hook(self._root_forward_hook)))

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
        self._grad_seen = False
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
        self._grad_seen = False
        self._marker_armed = False
        self.engine.discard_step()

    def is_current(self) -> bool:
        """Whether the engine was planned for the communicator's current world size and rank."""
        return self.engine.world == self.comm.size and self.engine.rank == self.comm.rank

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, layer: TorchLayer, module: nn.Module, inputs: Sequence[Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or not torch.is_tensor(output):
            return
        wanted = self.engine.capture_plan().get(layer.name)
        if not wanted:
            if output.requires_grad:
                self._arm_backward_marker(layer, output)
            return
        x = inputs[0]
        batch = layer.batch_size(x)
        dtype = layer.stat_dtype
        with torch.no_grad(), amp.autocast_disabled(output.device.type):
            if "A" in wanted:
                a_in = layer.a_input(amp.to_dtype(x.detach(), dtype))
                self.engine.accumulate(layer.name, "A", capture.a_statistic(self.ops, layer.spec, a_in, like=layer.stat_like()))
            x_hat = layer.x_hat(output) if "F" in wanted else None
        if not output.requires_grad:
            return
        from_backward = set() if self.mc else wanted
        if from_backward & {"G", "F"}:
            output.register_hook(eager_hook(functools.partial(self._output_grad_hook, layer, from_backward, batch, x_hat)))
        else:
            self._arm_backward_marker(layer, output)
        if self.mc and wanted & {"G", "F"}:
            self._mc_pending.append(_PendingOutput(layer, wanted, batch, x_hat, output))

    def _arm_backward_marker(self, layer: TorchLayer, output: torch.Tensor) -> None:
        """Nothing to capture from this layer's backward: one hook per forward pass (on the
        first layer that has nothing due) notes that backward ran."""
        if not self._marker_armed or layer is self.layers[0]:
            self._marker_armed = True
            output.register_hook(eager_hook(self._backward_marker))

    def _backward_marker(self, grad: torch.Tensor) -> None:
        if not self._in_mc_pass:
            self._backward_seen = True

    def _output_grad_hook(
        self, layer: TorchLayer, wanted: set, batch: int, x_hat: Optional[torch.Tensor], grad: torch.Tensor
    ) -> None:
        if self._in_mc_pass:  # the Monte-Carlo pass captures its gradients itself
            return
        self._backward_seen = True
        if wanted & {"G", "F"}:
            self._accumulate_output_statistics(layer, wanted, batch, x_hat, grad, amp.loss_scale(self.grad_scaler))

    def _accumulate_output_statistics(
        self, layer: TorchLayer, wanted: set, batch: int, x_hat: Optional[torch.Tensor], grad: torch.Tensor,
        loss_scale: float,
    ) -> None:
        """G and/or unit-wise F from output gradients of the (possibly loss-scaled) loss."""
        scale = float(batch) if self.config.loss_reduction is LossReduction.MEAN else 1.0
        scale /= loss_scale
        with torch.no_grad(), amp.autocast_disabled(grad.device.type):
            g = layer.g_output(amp.to_dtype(grad.detach(), layer.stat_dtype))
            if "G" in wanted:
                self.engine.accumulate(layer.name, "G", capture.g_statistic(self.ops, layer.spec, g, scale))
            if "F" in wanted:
                self.engine.accumulate(layer.name, "F", capture.f_statistic(self.ops, layer.spec, x_hat, g, scale))

    def _grad_accumulated(self, param: torch.Tensor) -> None:
        self._grad_seen = True

    def _root_forward_hook(self, module: nn.Module, inputs: Sequence[Any], output: Any) -> None:
        if self._mc_pending and torch.is_tensor(output):
            self.sample_fisher(output)

    def sample_fisher(self, output: torch.Tensor) -> None:
        """Run the Monte-Carlo backward pass for the forward pass that produced ``output``.

        Draws labels from ``output`` (``loss_family``), and takes G (and unit-wise F) of every
        layer due this step from ``torch.autograd.grad`` of the sampled loss w.r.t. the layers'
        captured outputs (``retain_graph=True``: the user's backward still runs). Called by a
        forward hook on the model when its output is a tensor; call it yourself after the
        forward otherwise. Does nothing when no statistic from gradients is due.

        Args:
            output: the model's logits (classes on the last axis) or predictions.
        """
        if not self.mc:
            raise RuntimeError("sample_fisher needs fisher_type='mc'")
        pending, self._mc_pending = self._mc_pending, []
        if not pending:
            return
        if not (torch.is_tensor(output) and output.requires_grad):
            raise TypeError(
                f"hvd_ngd: fisher_type='mc' needs the model's output as a tensor that requires grad, got "
                f"{type(output).__name__}: call kfac.sample_fisher(logits) after the forward pass"
            )
        scaler_scale = amp.loss_scale(self.grad_scaler)  # keeps fp16 gradients of the sampled loss in range
        with amp.autocast_disabled(output.device.type):
            targets = self.mc_sampler(output.detach())
            loss = fisher.sampled_loss(self.config.loss_family, output, targets, self.config.loss_reduction)
            if scaler_scale != 1.0:
                loss = loss * scaler_scale
        self._in_mc_pass = True
        try:
            grads = torch.autograd.grad(loss, [p.output for p in pending], retain_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if "donated buffer" not in str(exc):
                raise
            raise RuntimeError(
                "hvd_ngd: fisher_type='mc' backpropagates the sampled loss through the forward graph before "
                "your loss.backward() (retain_graph=True), which torch.compile's donated buffers forbid: set "
                "torch._functorch.config.donated_buffer = False before the first compiled call"
            ) from exc
        finally:
            self._in_mc_pass = False
        self.mc_passes += 1
        for p, grad in zip(pending, grads):
            if grad is not None:  # an output the loss does not depend on: the engine reports it at step()
                self._accumulate_output_statistics(p.layer, p.wanted, p.batch, p.x_hat, grad, scaler_scale)

    # ------------------------------------------------------------------ step
    def step(self, lr: Optional[float] = None, hyperparameters: Optional[Mapping[str, float]] = None) -> bool:
        """Precondition the registered layers' gradients in place.

        Returns True, or False when the step was skipped because some rank's gradients were not
        finite (``skip_nonfinite_steps``, on by default; a GradScaler overflow is such a step):
        then every parameter's ``.grad`` is set to None on every rank, so a following
        ``optimizer.step()`` changes nothing, and the step's statistics are dropped
        (``kfac.skipped_steps`` counts such steps).

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
            if self._grad_seen:
                raise RuntimeError(
                    "hvd_ngd: the registered layers have gradients but KFAC's hooks did not run in their forward "
                    "pass. Under torch.compile, build KFAC(model) before the first call of the compiled model "
                    "(a graph compiled earlier does not guard on hooks added later), or call "
                    "torch._dynamo.reset() after building it"
                )
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
        if self._mc_pending:
            names = sorted({p.layer.name for p in self._mc_pending})
            self._mc_pending = []
            self.abandon_step()
            raise RuntimeError(
                f"hvd_ngd: fisher_type='mc' captured outputs of {names} but no Monte-Carlo pass ran: the model's "
                "output is not a tensor, so call kfac.sample_fisher(logits) after the forward pass"
            )
        self.connect()
        self.last_step_skipped = False
        if not self.config.skip_nonfinite_steps and amp.scaler_enabled(self.grad_scaler) and self._overflowed():
            self.last_step_skipped = True
            self.abandon_step()
            return False
        grads = {layer.name: amp.to_dtype(layer.grad_matrix(), layer.stat_dtype) for layer in self.layers}
        others: List[torch.Tensor] = []
        if self.reduce_gradients:
            for p in self.other_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                others.append(amp.to_dtype(p.grad, torch.float32) if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad)
        device = next(iter(self.layers)).module.weight.device.type
        with amp.autocast_disabled(device):
            pgrads, others_out = self.engine.reduce_and_step(
                grads, others, self.reduce_gradients, hyperparameters, lr=None if lr is None else float(lr)
            )
        if self.engine.last_step_skipped:
            # Some rank's gradients were not finite: drop every gradient, so that the optimizer's
            # step() leaves the parameters (and its momentum) alone on every rank.
            for p in self.model.parameters():
                p.grad = None
            self.last_step_skipped = True
            self._backward_seen = self._grad_seen = self._marker_armed = False
            return False
        with torch.no_grad():
            writes = [w for layer in self.layers for w in layer.grad_writes(pgrads[layer.name])]
            torch._foreach_copy_([d for d, _ in writes], [s for _, s in writes])
            for p, g in zip(self.other_params if self.reduce_gradients else [], others_out):
                if g is not p.grad:
                    p.grad.copy_(g)
        self._backward_seen = False
        self._grad_seen = False
        self._marker_armed = False
        return True

    def _overflowed(self) -> bool:
        """Whether any rank's gradients overflowed under the GradScaler (the scaler skips such a
        step). Agreed over ranks with one small allreduce when gradients are still local
        (``reduce_gradients``); already averaged gradients overflow on every rank alike."""
        local = not amp.all_finite(p.grad for layer in self.layers for p in layer.params())
        if not (self.reduce_gradients and self.comm.size > 1):
            return local
        flag = torch.tensor([1.0 if local else 0.0], dtype=torch.float32)
        return float(self.comm.allreduce(flag, name="hvd_ngd.amp.overflow", average=True)[0]) > 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The complete K-FAC state, gathered from every rank (a collective: call it on every
        rank); it loads on any world size."""
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
