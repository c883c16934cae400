"""Wire formats: symmetric packing, fp16 transport, fusion of small tensors into buckets."""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

from hvd_ngd.enums import WireDtype
from hvd_ngd.ops.base import Array, ArrayOps


def packed_size(n: int) -> int:
    """Number of elements of the upper triangle (diagonal included) of an n x n matrix."""
    return n * (n + 1) // 2


def pack_symmetric(ops: ArrayOps, x: Array) -> Array:
    """Upper triangle of a symmetric matrix, row-major, as a vector of n(n+1)/2 elements."""
    n = ops.shape(x)[0]
    rows, cols = ops.triu_indices(n, x)
    return ops.gather2d(x, rows, cols)


def unpack_symmetric(ops: ArrayOps, v: Array, n: int) -> Array:
    """Inverse of ``pack_symmetric``."""
    rows, cols = ops.triu_indices(n, v)
    return ops.scatter_sym(v, rows, cols, n)


def to_wire(ops: ArrayOps, x: Array, wire_dtype: WireDtype) -> Array:
    """Cast for sending: float16 when asked; float64 stays float64 (exact tests), else float32."""
    if wire_dtype is WireDtype.FLOAT16:
        return ops.cast(x, "float16")
    return x if ops.dtype_name(x) in ("float32", "float64") else ops.cast(x, "float32")


def from_wire(ops: ArrayOps, x: Array, dtype_name: str) -> Array:
    """Cast a received tensor back to the statistic's dtype."""
    return x if ops.dtype_name(x) == dtype_name else ops.cast(x, dtype_name)


def fp16_relative_error_bound() -> float:
    """Relative rounding error of float16 for normal numbers (2^-11): |fp16(x) - x| <= 2^-11 |x|."""
    return 2.0**-11


@dataclasses.dataclass(frozen=True)
class FusionLayout:
    """Shapes of the tensors fused into one buffer, in order."""

    shapes: Tuple[Tuple[int, ...], ...]

    def sizes(self) -> List[int]:
        """Element counts."""
        out = []
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            out.append(n)
        return out


def fuse(ops: ArrayOps, tensors: Sequence[Array]) -> Tuple[Array, FusionLayout]:
    """Flatten and concatenate tensors of one dtype into a single 1-D buffer."""
    layout = FusionLayout(tuple(ops.shape(t) for t in tensors))
    return ops.concat([ops.flatten(t) for t in tensors], 0), layout


def unfuse(ops: ArrayOps, buffer: Array, layout: FusionLayout) -> List[Array]:
    """Split a fused buffer back into tensors of the original shapes."""
    out = []
    offset = 0
    for shape, n in zip(layout.shapes, layout.sizes()):
        out.append(ops.reshape(buffer[offset : offset + n], shape))
        offset += n
    return out


def bucket(sizes_in_bytes: Sequence[int], threshold: int) -> List[List[int]]:
    """Group consecutive tensor indices into buckets of at most ``threshold`` bytes.

    A tensor larger than the threshold gets a bucket of its own; threshold 0 disables fusion.
    """
    buckets: List[List[int]] = []
    current: List[int] = []
    filled = 0
    for i, size in enumerate(sizes_in_bytes):
        if current and (threshold == 0 or filled + size > threshold):
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets
