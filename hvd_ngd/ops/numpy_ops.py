"""Reference ``ArrayOps`` implementation on numpy arrays."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np


class NumpyOps:
    """``ArrayOps`` on ``numpy.ndarray``: the reference backend of the core and its tests."""

    name = "numpy"

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x, copy=True)

    def from_numpy(self, x: Any, like: Any | None = None) -> np.ndarray:
        return np.array(x, copy=True)

    def zeros(self, shape: Sequence[int], like: np.ndarray) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=like.dtype)

    def ones(self, shape: Sequence[int], like: np.ndarray) -> np.ndarray:
        return np.ones(tuple(shape), dtype=like.dtype)

    def eye(self, n: int, like: np.ndarray) -> np.ndarray:
        return np.eye(n, dtype=like.dtype)

    def dtype_name(self, x: np.ndarray) -> str:
        return str(np.asarray(x).dtype)

    def cast(self, x: np.ndarray, dtype_name: str) -> np.ndarray:
        return np.asarray(x).astype(dtype_name)

    def shape(self, x: np.ndarray) -> Tuple[int, ...]:
        return tuple(int(d) for d in np.shape(x))

    def reshape(self, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return np.reshape(x, tuple(shape))

    def transpose(self, x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2)

    def concat(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(list(xs), axis=axis)

    def stack(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.stack(list(xs), axis=axis)

    def flatten(self, x: np.ndarray) -> np.ndarray:
        return np.reshape(x, (-1,))

    def triu_indices(self, n: int, like: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return np.triu_indices(n)

    def gather2d(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return x[rows, cols]

    def amax(self, x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        return np.amax(x, axis=axis, keepdims=keepdims)

    def unstack(self, x: np.ndarray) -> List[np.ndarray]:
        return list(x)

    def total_sum(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return np.asarray(np.sum([np.sum(x, dtype=np.float64) for x in xs]))

    def flush_tiny(self, x: np.ndarray, threshold: float) -> np.ndarray:
        return np.where(np.abs(x) < threshold, np.zeros_like(x), x)

    def safe_reciprocal(self, x: np.ndarray) -> np.ndarray:
        safe = np.where(x == 0, np.ones_like(x), x)
        return np.where(x == 0, np.zeros_like(x), 1.0 / safe)

    def index(self, values: Any, like: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def take(self, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return x[indices]

    def scatter_sym(self, values: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros((n, n), dtype=values.dtype)
        out[rows, cols] = values
        out[cols, rows] = values
        return out

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.matmul(a, b)

    def sum(self, x: np.ndarray, axis: int | None = None) -> np.ndarray:
        return np.sum(x, axis=axis)

    def diag(self, x: np.ndarray) -> np.ndarray:
        return np.diag(x)

    def trace(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.trace(x))

    def sqrt(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(x)

    def abs(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x)

    def maximum(self, x: np.ndarray, y: np.ndarray | float) -> np.ndarray:
        return np.maximum(x, y)

    def frobenius_norm(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.linalg.norm(np.reshape(x, (-1,))))

    def all_finite(self, x: np.ndarray) -> bool:
        return bool(np.all(np.isfinite(x)))

    def to_float(self, x: np.ndarray) -> float:
        return float(x)

    def bincount(self, indices: np.ndarray, length: int, like: np.ndarray) -> np.ndarray:
        flat = np.reshape(np.asarray(indices), (-1,)).astype(np.int64)
        return np.bincount(flat, minlength=length)[:length].astype(like.dtype)

    def eigh(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        vals, vecs = np.linalg.eigh(x)
        return vals, vecs

    def cholesky_inverse(self, x: np.ndarray) -> np.ndarray:
        chol = np.linalg.cholesky(x)
        inv_chol = np.linalg.inv(chol)
        return inv_chol.T @ inv_chol
