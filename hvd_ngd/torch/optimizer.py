"""``hvd_ngd.torch.DistributedOptimizer``: a drop-in for ``hvd.DistributedOptimizer``."""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterable, Optional, Tuple

import horovod.torch as hvd
import torch
from torch import nn

from hvd_ngd.config import KFACConfig
from hvd_ngd.enums import Strategy
from hvd_ngd.torch import amp
from hvd_ngd.torch.preconditioner import KFAC, optimizer_hyperparameters


def _check_op(op: Any) -> None:
    if op == hvd.Adasum:
        raise ValueError(
            "hvd_ngd does not support op=hvd.Adasum: Adasum combines gradients inside synchronize() "
            "in a way that is not an average, so the natural gradient of the averaged loss cannot be "
            "formed; use op=hvd.Average (the default)"
        )


class _SPNGDOptimizer:
    """Mixin for a dynamically created subclass of the user's optimizer class (as Horovod does).

    Gradients are not allreduced by hooks: ``step()`` reduce-scatters them together with the
    curvature statistics, preconditions on the owner ranks and all-gathers the result.
    """

    def __init__(self, params: Any, kfac: KFAC, backward_passes_per_step: int) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc]
        self.kfac = kfac
        self.backward_passes_per_step = backward_passes_per_step

    def synchronize(self) -> None:
        """Present for API compatibility: SP-NGD communicates inside ``step()``."""

    @contextlib.contextmanager
    def skip_synchronize(self) -> Any:
        """Present for API compatibility."""
        yield

    def step(self, closure: Any = None) -> Any:
        if self.kfac._backward_seen:
            if amp.scaler_enabled(self.kfac.grad_scaler):
                amp.check_unscaled(self.kfac.grad_scaler, self)
            self.kfac.step(lr=self.param_groups[0]["lr"], hyperparameters=optimizer_hyperparameters(self))
            if self.kfac.last_step_skipped:  # gradients overflowed on some rank: no rank updates
                return None
        # Without a backward pass (e.g. hvd.broadcast_optimizer_state initialising state with
        # zero gradients) the step is a plain, local optimizer step on every rank.
        return super(self.__class__, self).step(closure)  # type: ignore[misc]


def _kaisa_step(self: Any, closure: Any = None) -> Any:
    """``step`` of a ``hvd.DistributedOptimizer`` wrapped with KAISA preconditioning."""
    if self.kfac._backward_seen:
        if not getattr(self, "_synchronized", False):  # the GradScaler recipe synchronizes before unscale_
            self.synchronize()
        if amp.scaler_enabled(self.kfac.grad_scaler):
            amp.check_unscaled(self.kfac.grad_scaler, self)
        self.kfac.step(lr=self.param_groups[0]["lr"], hyperparameters=optimizer_hyperparameters(self))
        if self.kfac.last_step_skipped:  # averaged gradients were not finite: the step is dropped
            self._synchronized = False  # as Horovod's step() would: the next step synchronizes again
            return None
        with self.skip_synchronize():
            return type(self).step(self, closure)
    return type(self).step(self, closure)


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    named_parameters: Optional[Iterable[Tuple[str, torch.Tensor]]] = None,
    backward_passes_per_step: int = 1,
    op: Any = None,
    grad_scaler: Any = None,
    mc_sampler: Any = None,
    **config: Any,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so ``step()`` averages, preconditions and applies gradients.

    Args:
        optimizer: the user's optimizer (SGD with momentum is the papers' choice).
        model: the model whose supported layers are preconditioned.
        named_parameters: as for ``hvd.DistributedOptimizer`` (KAISA strategies).
        backward_passes_per_step: backward passes (micro-batches) per ``step()``; factors are
            averaged over them, gradients summed as Horovod does.
        op: ``hvd.Average`` (default); ``hvd.Adasum`` is rejected.
        grad_scaler: optional ``torch.amp.GradScaler`` (see ``KFAC``). Order per step:
            ``scaler.scale(loss).backward()``; (KAISA strategies: ``optimizer.synchronize()``);
            ``scaler.unscale_(optimizer)``; ``optimizer.step()``; ``scaler.update()``. Call
            ``optimizer.step()`` itself, not ``scaler.step(optimizer)``: the scaler decides to
            skip a step from this rank's gradients alone, while ``step()`` here agrees on an
            overflow over all ranks (and skips the update and the K-FAC step everywhere).
        mc_sampler: optional label sampler for ``fisher_type='mc'`` (see ``KFAC``).
        **config: ``hvd_ngd.KFACConfig`` fields; ``strategy`` defaults to ``'spngd'`` here.

    Returns:
        An optimizer of the same class as ``optimizer`` (so LR schedulers work); the
        preconditioner is its ``kfac`` attribute.
    """
    op = hvd.Average if op is None else op
    _check_op(op)
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"invalid backward_passes_per_step={backward_passes_per_step!r}: must be an int >= 1")
    config.setdefault("strategy", Strategy.SPNGD)
    strategy = KFACConfig(**config).strategy
    if strategy is Strategy.SPNGD:
        kfac = KFAC(model, reduce_gradients=True, grad_scaler=grad_scaler, mc_sampler=mc_sampler, **config)
        members = {k: v for k, v in _SPNGDOptimizer.__dict__.items() if k not in ("__dict__", "__weakref__")}
        cls = type(optimizer.__class__.__name__, (optimizer.__class__,), members)
        return cls(optimizer.param_groups, kfac, backward_passes_per_step)
    kfac = KFAC(model, reduce_gradients=False, grad_scaler=grad_scaler, mc_sampler=mc_sampler, **config)
    if named_parameters is None:
        named_parameters = model.named_parameters()
    wrapped = hvd.DistributedOptimizer(
        optimizer, named_parameters=named_parameters, backward_passes_per_step=backward_passes_per_step, op=op
    )
    wrapped.kfac = kfac
    wrapped.step = types.MethodType(_kaisa_step, wrapped)
    return wrapped
