"""Mixed precision (``torch.autocast``, ``torch.amp.GradScaler``) in the torch adapter.

Rules (NGD_NOTES sections 3 and 7: bf16/fp16 factors break eigenvectors):
    * captured activations and output gradients are cast to the statistics' dtype (float32, or
      float64 for a float64 model) and factors are formed with autocast disabled, so the
      Gram matrices, running averages and decompositions are never computed in fp16/bf16;
    * gradient matrices enter the engine in that dtype and are written back into ``.grad`` in
      the parameter's dtype;
    * with a ``GradScaler`` the loss scale is divided out of the captured output gradients, the
      scaler must have unscaled ``.grad`` before ``KFAC.step()`` (``scaler.unscale_(optimizer)``),
      and a step whose gradients overflowed (the scaler will skip it) is dropped by K-FAC too:
      its statistics are discarded and no preconditioning runs (see ``overflowed``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch


@contextlib.contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Run the enclosed statistics math at full precision even inside a user's autocast region."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when it is a floating tensor (integer ids stay as they are)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def scaler_enabled(scaler: Any) -> bool:
    """Whether ``scaler`` is an enabled ``GradScaler``."""
    return scaler is not None and scaler.is_enabled()


def loss_scale(scaler: Any) -> float:
    """The scaler's current loss scale (1 without an enabled scaler); a host sync."""
    return float(scaler.get_scale()) if scaler_enabled(scaler) else 1.0


def all_finite(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether every given gradient is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def check_unscaled(scaler: Any, optimizer: Any) -> None:
    """Raise when ``scaler`` has not unscaled ``optimizer``'s gradients at this step.

    K-FAC's KL clipping and damping act on the true gradient scale, so preconditioning scaled
    gradients would be wrong in silence. Uses the scaler's per-optimizer stage, which
    ``unscale_`` records (skipped when this torch version keeps it elsewhere).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None or optimizer is None:
        return
    state = states.get(id(optimizer)) if id(optimizer) in states else None
    stage = state.get("stage") if state is not None else None
    if getattr(stage, "name", "READY") != "UNSCALED":
        raise RuntimeError(
            "hvd_ngd: the GradScaler has not unscaled the gradients before the K-FAC step: call "
            "scaler.unscale_(optimizer) after backward (and after optimizer.synchronize()), then step"
        )
