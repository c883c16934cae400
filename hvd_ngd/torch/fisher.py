"""The 1-sample Monte-Carlo ("true") Fisher: labels sampled from the model's predictive
distribution, and the loss of those labels whose gradients give G (``fisher_type='mc'``).

The sampled loss has the same form and batch reduction as the training loss of the family
(``KFACConfig.loss_reduction``), so the captured output gradients go through exactly the
scaling of the empirical path (NGD_NOTES section 2: gradients of the summed loss); only the
labels differ. For a loss that is a negative log-likelihood, E_y~p[g g^T] is then the Fisher
(equal to the Gauss-Newton matrix of the loss w.r.t. the outputs):
    * cross-entropy on logits (classes on the last axis): y ~ Categorical(softmax(f));
    * squared error (f - y)^2 per element (``F.mse_loss``): y ~ N(f, 1/2 I), whose negative
      log-likelihood is (f - y)^2 up to a constant, so E[g g^T] = 2 I per element (its Hessian).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from hvd_ngd.enums import LossFamily, LossReduction

#: ``sampler(output) -> targets``: draws labels/targets for a (detached) model output.
Sampler = Callable[[torch.Tensor], torch.Tensor]

MSE_VARIANCE = 0.5  # (f - y)^2 is the negative log-likelihood of N(f, 1/2) up to a constant


def sample_targets(family: LossFamily, output: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one label (cross-entropy) or target (squared error) per output row from the model.

    Args:
        family: the loss family.
        output: the model's output (logits with classes on the last axis, or predictions).
        generator: optional ``torch.Generator`` (for reproducible draws).

    Returns:
        Class indices of shape ``output.shape[:-1]`` (cross-entropy) or float targets shaped
        like ``output`` (squared error).
    """
    f = output.detach().float()
    if family is LossFamily.CROSS_ENTROPY:
        if f.dim() < 1:
            raise ValueError("fisher_type='mc' with loss_family='cross_entropy' needs logits with a class axis")
        probs = torch.softmax(f.reshape(-1, f.shape[-1]), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).reshape(f.shape[:-1])
    if family is LossFamily.MSE:
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + math.sqrt(MSE_VARIANCE) * noise
    raise ValueError(f"unknown loss family {family!r}")  # pragma: no cover - enum is exhaustive


def sampled_loss(family: LossFamily, output: torch.Tensor, targets: torch.Tensor, reduction: LossReduction) -> torch.Tensor:
    """The training loss of ``family`` at sampled ``targets``, reduced like the user's loss
    (``MEAN``: over every row / element, as ``F.cross_entropy`` and ``F.mse_loss`` do by
    default; ``SUM``: summed), computed in float32 or better."""
    f = output if output.dtype == torch.float64 else output.float()
    red = "mean" if reduction is LossReduction.MEAN else "sum"
    if family is LossFamily.CROSS_ENTROPY:
        return F.cross_entropy(f.reshape(-1, f.shape[-1]), targets.reshape(-1), reduction=red)
    if family is LossFamily.MSE:
        return F.mse_loss(f, targets.to(f.dtype), reduction=red)
    raise ValueError(f"unknown loss family {family!r}")  # pragma: no cover


def default_sampler(family: LossFamily, generator: Optional[torch.Generator] = None) -> Sampler:
    """The sampler of ``family`` (a closure over an optional generator)."""
    return lambda output: sample_targets(family, output, generator)
