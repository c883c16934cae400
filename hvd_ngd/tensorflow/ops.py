"""``ArrayOps`` on TensorFlow tensors: the core's math runs on TF tensors (eagerly).

Mirrors ``hvd_ngd.torch.ops.TorchOps`` method by method. TensorFlow places tensors itself, so
the ``like`` arguments only give dtypes here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import tensorflow as tf


class TFOps:
    """``hvd_ngd.ops.ArrayOps`` implemented with TensorFlow."""

    name = "tensorflow"

    def __init__(self) -> None:
        self._triu: Dict[int, Tuple[tf.Tensor, tf.Tensor]] = {}
        self._pairs_of: Dict[int, Tuple[tf.Tensor, tf.Tensor, tf.Tensor]] = {}

    def to_numpy(self, x: tf.Tensor) -> np.ndarray:
        return np.array(x.numpy(), copy=True)

    def from_numpy(self, x: Any, like: tf.Tensor | None = None) -> tf.Tensor:
        return tf.constant(np.array(x, copy=True))

    def zeros(self, shape: Sequence[int], like: tf.Tensor) -> tf.Tensor:
        return tf.zeros(tuple(shape), dtype=like.dtype)

    def ones(self, shape: Sequence[int], like: tf.Tensor) -> tf.Tensor:
        return tf.ones(tuple(shape), dtype=like.dtype)

    def eye(self, n: int, like: tf.Tensor) -> tf.Tensor:
        return tf.eye(n, dtype=like.dtype)

    def dtype_name(self, x: tf.Tensor) -> str:
        return tf.as_dtype(x.dtype).name

    def cast(self, x: tf.Tensor, dtype_name: str) -> tf.Tensor:
        return tf.cast(x, tf.as_dtype(dtype_name))

    def shape(self, x: tf.Tensor) -> Tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def reshape(self, x: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
        return tf.reshape(x, tuple(shape))

    def transpose(self, x: tf.Tensor) -> tf.Tensor:
        return tf.transpose(x) if x.shape.rank == 2 else tf.linalg.matrix_transpose(x)

    def concat(self, xs: Sequence[tf.Tensor], axis: int) -> tf.Tensor:
        return tf.concat(list(xs), axis=axis)

    def stack(self, xs: Sequence[tf.Tensor], axis: int) -> tf.Tensor:
        return tf.stack(list(xs), axis=axis)

    def flatten(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(x, (-1,))

    def triu_indices(self, n: int, like: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        if n not in self._triu:  # cached: packing runs for every factor at every step
            rows, cols = np.triu_indices(n)
            self._triu[n] = (tf.constant(rows, dtype=tf.int64), tf.constant(cols, dtype=tf.int64))
            self._pairs_of[id(self._triu[n][0])] = (*self._triu[n], tf.constant(np.stack([rows, cols], 1), tf.int64))
        return self._triu[n]

    def _pairs(self, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
        """(k, 2) indices for gather_nd/scatter_nd (precomputed for ``triu_indices`` results)."""
        hit = self._pairs_of.get(id(rows))
        if hit is not None and hit[0] is rows and hit[1] is cols:
            return hit[2]
        return tf.stack([rows, cols], axis=1)

    def gather2d(self, x: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
        return tf.gather_nd(x, self._pairs(rows, cols))

    def amax(self, x: tf.Tensor, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def unstack(self, x: tf.Tensor) -> List[tf.Tensor]:
        return tf.unstack(x, axis=0)

    def total_sum(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        dtype = tf.float64 if any(x.dtype == tf.float64 for x in xs) else tf.float32
        return tf.add_n([tf.cast(tf.reduce_sum(x), dtype) for x in xs])

    def flush_tiny(self, x: tf.Tensor, threshold: float) -> tf.Tensor:
        return tf.where(tf.abs(x) < threshold, tf.zeros_like(x), x)

    def safe_reciprocal(self, x: tf.Tensor) -> tf.Tensor:
        zero = tf.equal(x, 0)
        return tf.where(zero, tf.zeros_like(x), 1.0 / tf.where(zero, tf.ones_like(x), x))

    def index(self, values: Any, like: tf.Tensor) -> tf.Tensor:
        return tf.constant(np.asarray(values, dtype=np.int64), dtype=tf.int64)

    def take(self, x: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
        return tf.gather(x, indices)

    def scatter_sym(self, values: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor, n: int) -> tf.Tensor:
        upper = tf.scatter_nd(self._pairs(rows, cols), values, (n, n))
        return upper + tf.transpose(upper) - tf.linalg.diag(tf.linalg.diag_part(upper))

    def matmul(self, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        return tf.matmul(a, b)

    def sum(self, x: tf.Tensor, axis: int | None = None) -> tf.Tensor:
        return tf.reduce_sum(x, axis=axis)

    def diag(self, x: tf.Tensor) -> tf.Tensor:
        return tf.linalg.diag(x) if len(x.shape) == 1 else tf.linalg.diag_part(x)

    def trace(self, x: tf.Tensor) -> tf.Tensor:
        return tf.linalg.trace(x)

    def sqrt(self, x: tf.Tensor) -> tf.Tensor:
        return tf.sqrt(x)

    def abs(self, x: tf.Tensor) -> tf.Tensor:
        return tf.abs(x)

    def maximum(self, x: tf.Tensor, y: Any) -> tf.Tensor:
        # A Python float goes straight to x's dtype (tf.cast would round it through float32).
        other = tf.cast(y, x.dtype) if tf.is_tensor(y) else tf.constant(y, dtype=x.dtype)
        return tf.maximum(x, other)

    def frobenius_norm(self, x: tf.Tensor) -> tf.Tensor:
        return tf.norm(tf.reshape(x, (-1,)))

    def all_finite(self, x: tf.Tensor) -> bool:
        return bool(tf.reduce_all(tf.math.is_finite(x)).numpy())

    def to_float(self, x: tf.Tensor) -> float:
        return float(x.numpy()) if hasattr(x, "numpy") else float(x)

    def bincount(self, indices: tf.Tensor, length: int, like: tf.Tensor) -> tf.Tensor:
        flat = tf.cast(tf.reshape(indices, (-1,)), tf.int32)
        return tf.math.bincount(flat, minlength=length, maxlength=length, dtype=like.dtype)

    def eigh(self, x: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        vals, vecs = tf.linalg.eigh(x)
        return vals, vecs

    def cholesky_inverse(self, x: tf.Tensor) -> tf.Tensor:
        chol = tf.linalg.cholesky(x)
        if not bool(tf.reduce_all(tf.math.is_finite(chol)).numpy()):
            raise tf.errors.InvalidArgumentError(None, None, "Cholesky decomposition failed: not positive definite")
        return tf.linalg.cholesky_solve(chol, tf.eye(int(x.shape[0]), dtype=x.dtype))
