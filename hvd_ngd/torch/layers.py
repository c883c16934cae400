"""Per-module capture: canonical layouts of inputs/output gradients and gradient matrices.

Each supported ``torch.nn`` module gets one ``TorchLayer`` (a grouped convolution one per group)
that only reshapes tensors into the core's canonical layouts (see ``hvd_ngd.capture``) and
reads/writes the layer's gradient as a matrix; the curvature math itself lives in the core.

Treatment of ``torch.nn`` modules (docs/layers.md has the user-facing table):
    * Kronecker: Linear; Conv1d/Conv2d (any padding mode, ``padding='same'``); a grouped or
      depthwise convolution (``groups > 1``) gets one Kronecker block per group, registered
      as ``"name#g<i>"``; Embedding (dense gradients).
    * Unit-wise 2x2: BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, InstanceNorm1d/2d/3d
      (affine), LayerNorm (affine with bias).
    * Skipped with a warning: MultiheadAttention (its projections run functionally), the
      supported classes in configurations listed in ``make_layers``, and the parameterised
      layers of ``UNSUPPORTED`` (they keep their plain gradient).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

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


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Element type of factors and decompositions for parameters of ``dtype``: float64 for
    float64 models, float32 otherwise (fp16/bf16 factors break eigendecompositions)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchLayer:
    """A registered module (or one group of a grouped convolution).

    Attributes:
        name: qualified name of the statistics (identical on every rank).
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

    @property
    def stat_dtype(self) -> torch.dtype:
        """Element type of this layer's statistics (fp32 for fp16/bf16/fp32 parameters)."""
        return statistics_dtype(self.module.weight.dtype)

    def stat_like(self) -> torch.Tensor:
        """An empty tensor of the statistics' dtype on the parameters' device."""
        return torch.empty((), dtype=self.stat_dtype, device=self.module.weight.device)

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

    def _weight_grad(self) -> torch.Tensor:
        w = self.module.weight.grad
        if w is None:
            raise RuntimeError(f"layer {self.name!r} has no gradient: call loss.backward() before step()")
        return w

    def grad_matrix(self) -> torch.Tensor:
        """The layer's gradient as the core's matrix (weight grad, bias grad as last column)."""
        w = self._weight_grad()
        mat = w if w.dim() == 2 else w.reshape(w.shape[0], -1)
        bias = self.module.bias
        if bias is not None:
            mat = torch.cat([mat, bias.grad.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def grad_writes(self, mat: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """How a (preconditioned) gradient matrix goes back into ``.grad``: (destination ``.grad``
        view, source view of ``mat``) pairs; the adapter copies every layer's pairs in one fused
        ``_foreach_copy_`` (which casts to the grad's dtype)."""
        wgrad = self.module.weight.grad
        bias = self.module.bias
        if bias is None:
            return [(wgrad, mat if wgrad.dim() == 2 else mat.reshape(wgrad.shape))]
        w, b = mat.split(mat.shape[1] - 1, 1)
        return [(wgrad, w if wgrad.dim() == 2 else w.reshape(wgrad.shape)), (bias.grad, b.squeeze(1))]


class LinearLayer(TorchLayer):
    """``nn.Linear``: activations (N, in); sequence dimensions fold into N."""

    kind = LayerKind.LINEAR

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])


def _pair(v: Union[int, Sequence[int]], dims: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


class ConvLayer(TorchLayer):
    """``nn.Conv1d`` / ``nn.Conv2d``, or one group of a grouped (depthwise) one.

    im2col patches in the weight's (c, i, j) order (a Conv1d is a Conv2d of kernel height 1,
    so both use the core's CONV2D factors). Padding modes other than zeros and
    ``padding='same'``/``'valid'`` pad explicitly first, as ``nn.Conv*`` itself does.
    The group ``group`` of ``groups`` owns input channels ``group*C_in/groups ...`` and
    output channels ``group*C_out/groups ...`` (the rows of the weight).
    """

    kind = LayerKind.CONV2D

    def __init__(self, name: str, module: nn.Module, spec: LayerSpec, group: int = 0) -> None:
        super().__init__(name, module, spec)
        self.group = group
        groups = module.groups
        self.in_slice = slice(group * module.in_channels // groups, (group + 1) * module.in_channels // groups)
        self.out_slice = slice(group * module.out_channels // groups, (group + 1) * module.out_channels // groups)
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        self.dims = dims
        kernel = _pair(module.kernel_size, dims)
        dilation = _pair(module.dilation, dims)
        if isinstance(module.padding, str):
            pads: List[int] = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = 0 if module.padding == "valid" else d * (k - 1)
                pads += [total // 2, total - total // 2]
            self.explicit_pad: Optional[List[int]] = pads
        elif module.padding_mode != "zeros":
            self.explicit_pad = [p for p in reversed(_pair(module.padding, dims)) for _ in range(2)]
        else:
            self.explicit_pad = None
        self.padding = (0,) * dims if self.explicit_pad is not None else _pair(module.padding, dims)
        self.pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = x[:, self.in_slice] if m.groups > 1 else x
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad, mode=self.pad_mode)
        kernel, dilation, stride, padding = (
            _pair(m.kernel_size, self.dims), _pair(m.dilation, self.dims), _pair(m.stride, self.dims), self.padding
        )
        if self.dims == 1:
            x = x.unsqueeze(2)
            kernel, dilation, stride, padding = (1,) + kernel, (1,) + dilation, (1,) + stride, (0,) + padding
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches.transpose(1, 2)  # (N, L, C_group*k)

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        g = grad_output[:, self.out_slice] if self.module.groups > 1 else grad_output
        n, c = g.shape[:2]
        return g.reshape(n, c, -1).transpose(1, 2)  # (N, L, out_group)

    def grad_matrix(self) -> torch.Tensor:
        w = self._weight_grad()[self.out_slice]
        mat = w.reshape(w.shape[0], -1)
        if self.module.bias is not None:
            mat = torch.cat([mat, self.module.bias.grad[self.out_slice].reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def grad_writes(self, mat: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        rows = self.module.weight.grad[self.out_slice]
        n_in = mat.shape[1] - (1 if self.module.bias is not None else 0)
        writes = [(rows, mat[:, :n_in].reshape(rows.shape))]
        if self.module.bias is not None:
            writes.append((self.module.bias.grad[self.out_slice], mat[:, n_in]))
        return writes


class EmbeddingLayer(TorchLayer):
    """``nn.Embedding``: A is diagonal (token frequencies); gradient matrix is weight_grad^T."""

    kind = LayerKind.EMBEDDING

    def a_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def g_output(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def grad_matrix(self) -> torch.Tensor:
        w = self._weight_grad()
        if w.is_sparse:
            raise UnsupportedLayerError(f"layer {self.name!r}: sparse Embedding gradients are not supported")
        return w.t()

    def grad_writes(self, mat: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [(self.module.weight.grad, mat.t())]


class UnitwiseLayer(TorchLayer):
    """Normalisation layers: unit-wise 2x2 Fisher per channel from x_hat = (y - beta) / gamma."""

    def x_hat(self, output: torch.Tensor) -> torch.Tensor:
        """Normalized input recovered from the output, in the (N, C, L) layout and the
        statistics' dtype."""
        dtype = self.stat_dtype
        w = self.module.weight.detach().to(dtype)
        b = self.module.bias.detach().to(dtype)
        return unitwise.normalized_input(_OPS, self.to_ncl(output.detach().to(dtype)), w, b)

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

    def grad_writes(self, mat: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [
            (self.module.weight.grad, mat[0].reshape(self.module.weight.shape)),
            (self.module.bias.grad, mat[1].reshape(self.module.bias.shape)),
        ]


class ChannelNormLayer(UnitwiseLayer):
    """Per-channel affine normalisation with channels on axis 1: ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm1d/2d/3d`` (affine). Whatever the
    layer normalises over, y = gamma_c x_hat + beta_c per channel, so x_hat is recovered alike."""

    kind = LayerKind.BATCHNORM

    def to_ncl(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1)


BatchNormLayer = ChannelNormLayer


class LayerNormLayer(UnitwiseLayer):
    """``nn.LayerNorm``: units are the normalized trailing dimensions; L = middle dimensions."""

    kind = LayerKind.LAYERNORM

    def to_ncl(self, t: torch.Tensor) -> torch.Tensor:
        units = math.prod(self.module.normalized_shape)
        return t.reshape(t.shape[0], -1, units).transpose(1, 2)


#: Parameterised ``torch.nn`` layers hvd_ngd does not precondition, with the reason (warned).
UNSUPPORTED: Tuple[Tuple[type, str], ...] = tuple(
    (cls, reason)
    for cls, reason in (
        (getattr(nn, "Conv3d", None), "Conv3d is not implemented (only Conv1d/Conv2d)"),
        (getattr(nn, "ConvTranspose1d", None), "transposed convolutions are not implemented"),
        (getattr(nn, "ConvTranspose2d", None), "transposed convolutions are not implemented"),
        (getattr(nn, "ConvTranspose3d", None), "transposed convolutions are not implemented"),
        (getattr(nn, "Bilinear", None), "Bilinear has two inputs (no single Kronecker factor A)"),
        (getattr(nn, "EmbeddingBag", None), "EmbeddingBag pools rows before the output (no per-row G)"),
        (getattr(nn, "RNNBase", None), "recurrent layers apply their weights functionally over time"),
        (getattr(nn, "RMSNorm", None), "RMSNorm has no bias, so there is no 2x2 (gamma, beta) block"),
        (getattr(nn, "PReLU", None), "PReLU's slope is not a Kronecker-factored weight"),
    )
    if cls is not None
)

MHA_REASON = (
    "nn.MultiheadAttention computes its projections functionally inside "
    "F.multi_head_attention_forward (in_proj_weight / q,k,v_proj_weight and out_proj.weight), "
    "so no module hook sees their inputs or output gradients; its parameters, out_proj "
    "included, keep their plain gradient"
)


def functional_submodules(model: nn.Module) -> Dict[int, str]:
    """Submodules whose weights a parent uses functionally (their own forward never runs),
    by ``id``, with the name of that parent: ``out_proj`` of every ``nn.MultiheadAttention``."""
    out: Dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            out[id(module.out_proj)] = name or "root"
    return out


_KNOWN = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
)


def make_layer(name: str, module: nn.Module) -> Tuple[Optional[Union[TorchLayer, List[TorchLayer]]], Optional[str]]:
    """A ``TorchLayer`` (a list of them for a grouped convolution) for a supported module, or
    (None, reason) when it is not preconditioned."""
    if isinstance(module, nn.MultiheadAttention):
        return None, MHA_REASON
    if isinstance(module, _KNOWN):
        frozen = [n for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
        if frozen:
            return None, f"{', '.join(frozen)} does not require grad"
    if isinstance(module, nn.Linear):
        spec = LayerSpec(name, LayerKind.LINEAR, module.in_features, module.out_features, module.bias is not None)
        return LinearLayer(name, module, spec), None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = math.prod(_pair(module.kernel_size, 1 if isinstance(module, nn.Conv1d) else 2))
        groups = module.groups
        c_in, c_out = module.in_channels // groups, module.out_channels // groups
        if groups == 1:
            spec = LayerSpec(name, LayerKind.CONV2D, c_in * k, c_out, module.bias is not None)
            return ConvLayer(name, module, spec), None
        out: List[TorchLayer] = []
        for g in range(groups):
            spec = LayerSpec(f"{name}#g{g}", LayerKind.CONV2D, c_in * k, c_out, module.bias is not None)
            out.append(ConvLayer(spec.name, module, spec, group=g))
        return out, None
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "sparse=True (sparse gradients are not supported)"
        spec = LayerSpec(name, LayerKind.EMBEDDING, module.num_embeddings, module.embedding_dim, False)
        return EmbeddingLayer(name, module, spec), None
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
        if not (module.affine and module.weight is not None and module.bias is not None):
            return None, "affine=False (no parameters)"
        spec = LayerSpec(name, LayerKind.BATCHNORM, channels, channels, True)
        return ChannelNormLayer(name, module, spec), None
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.bias is None:
            return None, "needs elementwise_affine=True with a bias (the unit-wise block is (gamma, beta))"
        units = math.prod(module.normalized_shape)
        spec = LayerSpec(name, LayerKind.LAYERNORM, units, units, True)
        return LayerNormLayer(name, module, spec), None
    for cls, reason in UNSUPPORTED:
        if isinstance(module, cls) and any(p.requires_grad for p in module.parameters(recurse=False)):
            return None, f"{reason}; it keeps its plain gradient"
    return None, None
