"""Per-module capture: canonical layouts of inputs/output gradients and gradient matrices.

Each supported ``torch.nn`` module gets a ``TorchLayer`` that only reshapes tensors into the
core's canonical layouts (see ``hvd_ngd.capture``) and reads/writes the layer's gradient as a
matrix; the curvature math itself lives in the core.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hvd_ngd import unitwise
from hvd_ngd.enums import LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.torch.ops import TorchOps


_OPS = TorchOps()


class UnsupportedLayerError(ValueError):
    """A module of a supported class uses a configuration hvd_ngd cannot precondition."""


class TorchLayer:
    """A registered module.

    Attributes:
        name: qualified module name (identical on every rank).
        module: the module.
        spec: its framework-neutral description.
    """

    kind: LayerKind

    def __init__(self, name: str, module: nn.Module, spec: LayerSpec) -> None:
        self.name = name
        self.module = module
        self.spec = spec

    def params(self) -> List[nn.Parameter]:
        """Parameters whose gradients this layer preconditions (weight, then bias)."""
        out = [self.module.weight]
        if getattr(self.module, "bias", None) is not None:
            out.append(self.module.bias)
        return out

    @staticmethod
    def batch_size(inputs: torch.Tensor) -> int:
        """Local batch size of the captured micro-batch (first dimension)."""
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical activations for the A factor."""
        raise NotImplementedError

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Canonical output gradients for the G factor (or unit-wise Fisher)."""
        raise NotImplementedError

    def grad_matrix(self) -> torch.Tensor:
        """The layer's gradient as the core's matrix (weight grad, bias grad as last column)."""
        w = self.module.weight.grad
        if w is None:
            raise RuntimeError(f"layer {self.name!r} has no gradient: call loss.backward() before step()")
        mat = w.reshape(w.shape[0], -1)
        if self.module.bias is not None:
            b = self.module.bias.grad
            mat = torch.cat([mat, b.reshape(-1, 1)], dim=1)
        return mat

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        """Write a (preconditioned) gradient matrix back into ``.grad``."""
        w = self.module.weight
        n_in = mat.shape[1] - (1 if self.module.bias is not None else 0)
        w.grad.copy_(mat[:, :n_in].reshape(w.shape))
        if self.module.bias is not None:
            self.module.bias.grad.copy_(mat[:, n_in].reshape(self.module.bias.shape))


class LinearLayer(TorchLayer):
    """``nn.Linear``: activations (N, in); sequence dimensions fold into N."""

    kind = LayerKind.LINEAR

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])


class Conv2dLayer(TorchLayer):
    """``nn.Conv2d`` (groups=1, zero padding): im2col patches in the weight's (c, i, j) order."""

    kind = LayerKind.CONV2D

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return patches.transpose(1, 2)  # (N, L, C*kh*kw)

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        n, c = grad_output.shape[:2]
        return grad_output.reshape(n, c, -1).transpose(1, 2)  # (N, L, out)


class EmbeddingLayer(TorchLayer):
    """``nn.Embedding``: A is diagonal (token frequencies); gradient matrix is weight_grad^T."""

    kind = LayerKind.EMBEDDING

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def grad_matrix(self) -> torch.Tensor:
        w = self.module.weight.grad
        if w is None:
            raise RuntimeError(f"layer {self.name!r} has no gradient: call loss.backward() before step()")
        if w.is_sparse:
            raise UnsupportedLayerError(f"layer {self.name!r}: sparse Embedding gradients are not supported")
        return w.t()

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        self.module.weight.grad.copy_(mat.t())


class UnitwiseLayer(TorchLayer):
    """BatchNorm/LayerNorm: unit-wise 2x2 Fisher per channel from x_hat = (y - beta) / gamma."""

    def x_hat(self, output: torch.Tensor) -> torch.Tensor:
        """Normalized input recovered from the output, in the (N, C, L) layout."""
        return unitwise.normalized_input(_OPS, self.to_ncl(output.detach()), self.module.weight.detach(), self.module.bias.detach())

    def to_ncl(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, L) view of an output-shaped tensor."""
        raise NotImplementedError

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        return self.to_ncl(grad_output)

    def grad_matrix(self) -> torch.Tensor:
        w, b = self.module.weight.grad, self.module.bias.grad
        if w is None or b is None:
            raise RuntimeError(f"layer {self.name!r} has no gradient: call loss.backward() before step()")
        return torch.stack([w.reshape(-1), b.reshape(-1)], dim=0)

    def set_grad_matrix(self, mat: torch.Tensor) -> None:
        self.module.weight.grad.copy_(mat[0].reshape(self.module.weight.shape))
        self.module.bias.grad.copy_(mat[1].reshape(self.module.bias.shape))


class BatchNormLayer(UnitwiseLayer):
    """``nn.BatchNorm1d/2d`` and ``nn.SyncBatchNorm``: channels on axis 1."""

    kind = LayerKind.BATCHNORM

    def to_ncl(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1)


class LayerNormLayer(UnitwiseLayer):
    """``nn.LayerNorm``: units are the normalized trailing dimensions; L = middle dimensions."""

    kind = LayerKind.LAYERNORM

    def to_ncl(self, t: torch.Tensor) -> torch.Tensor:
        units = math.prod(self.module.normalized_shape)
        return t.reshape(t.shape[0], -1, units).transpose(1, 2)


def make_layer(name: str, module: nn.Module) -> Tuple[Optional[TorchLayer], Optional[str]]:
    """A ``TorchLayer`` for a supported module, or (None, reason) when it is not preconditioned."""
    if isinstance(module, nn.Linear):
        if not module.weight.requires_grad:
            return None, "weight does not require grad"
        spec = LayerSpec(name, LayerKind.LINEAR, module.in_features, module.out_features, module.bias is not None)
        return LinearLayer(name, module, spec), None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None, f"padding={module.padding!r}, padding_mode={module.padding_mode!r} (numeric zero padding only)"
        kh, kw = module.kernel_size
        spec = LayerSpec(name, LayerKind.CONV2D, module.in_channels * kh * kw, module.out_channels, module.bias is not None)
        return Conv2dLayer(name, module, spec), None
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "sparse=True"
        spec = LayerSpec(name, LayerKind.EMBEDDING, module.num_embeddings, module.embedding_dim, False)
        return EmbeddingLayer(name, module, spec), None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.BatchNorm3d):
        if not module.affine:
            return None, "affine=False (no parameters)"
        spec = LayerSpec(name, LayerKind.BATCHNORM, module.num_features, module.num_features, True)
        return BatchNormLayer(name, module, spec), None
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.bias is None:
            return None, "needs elementwise_affine=True with a bias"
        units = math.prod(module.normalized_shape)
        spec = LayerSpec(name, LayerKind.LAYERNORM, units, units, True)
        return LayerNormLayer(name, module, spec), None
    return None, None
