"""``ArrayOps`` on torch tensors: the core's math stays on the model's device."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
import torch

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class TorchOps:
    """``hvd_ngd.ops.ArrayOps`` implemented with torch."""

    name = "torch"

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy().copy()

    def from_numpy(self, x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(np.array(x, copy=True))
        return t.to(like.device) if like is not None else t

    def zeros(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device)

    def ones(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        return torch.ones(tuple(shape), dtype=like.dtype, device=like.device)

    def eye(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.eye(n, dtype=like.dtype, device=like.device)

    def dtype_name(self, x: torch.Tensor) -> str:
        return _NAMES.get(x.dtype, str(x.dtype).replace("torch.", ""))

    def cast(self, x: torch.Tensor, dtype_name: str) -> torch.Tensor:
        return x.to(_DTYPES[dtype_name])

    def shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def reshape(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return x.reshape(tuple(shape))

    def transpose(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)

    def concat(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def stack(self, xs: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.stack(list(xs), dim=axis)

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)

    def triu_indices(self, n: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.triu_indices(n, n, device=like.device)
        return idx[0], idx[1]

    def gather2d(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return x[rows, cols]

    def amax(self, x: torch.Tensor, axis: Any = None, keepdims: bool = False) -> torch.Tensor:
        if axis is None:
            return torch.amax(x) if not keepdims else torch.amax(x, dim=tuple(range(x.dim())), keepdim=True)
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def unstack(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(x.unbind(0))

    def total_sum(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        if xs[0].is_cuda:
            # one fused launch per dtype instead of one reduction per tensor (the L1 norm: inf or
            # NaN exactly when the sum is); on CPU that kernel is slower than per-tensor sums.
            parts = [n.to(dtype) for n in torch._foreach_norm(list(xs), 1, dtype=dtype)]
        else:
            parts = [x.sum(dtype=dtype) for x in xs]
        return torch.stack(parts).sum() if len(parts) > 1 else parts[0]

    def flush_tiny(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        return torch.nn.functional.hardshrink(x, threshold)  # one fused pass: 0 where |x| <= threshold

    def safe_reciprocal(self, x: torch.Tensor) -> torch.Tensor:
        zero = x == 0
        return torch.where(zero, torch.zeros_like(x), 1.0 / torch.where(zero, torch.ones_like(x), x))

    def index(self, values: Any, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64, device=like.device)

    def take(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return x[indices]

    def scatter_sym(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros((n, n), dtype=values.dtype, device=values.device)
        out[rows, cols] = values
        out[cols, rows] = values
        return out

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)

    def sum(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return x.sum() if axis is None else x.sum(dim=axis)

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        return torch.diag(x)

    def trace(self, x: torch.Tensor) -> torch.Tensor:
        return torch.trace(x)

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)

    def maximum(self, x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:
        if not torch.is_tensor(y):
            return torch.clamp(x, min=y)
        return torch.maximum(x, y)

    def frobenius_norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.reshape(-1))

    def all_finite(self, x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def to_float(self, x: torch.Tensor) -> float:
        return float(x)

    def bincount(self, indices: torch.Tensor, length: int, like: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(indices.reshape(-1).long(), minlength=length)[:length]
        return counts.to(dtype=like.dtype, device=like.device)

    def eigh(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vals, vecs = torch.linalg.eigh(x)
        # Contiguous so that results do not depend on memory layout (bitwise-reproducible
        # resumes: restored eigenvectors are contiguous too).
        return vals, vecs.contiguous()

    def cholesky_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(x))
