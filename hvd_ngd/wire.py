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
    """Upper triangle of a symmetric matrix, row-major, as a vector of n(n+1)/2 elements.

    Raises:
        ValueError: ``x`` is not a square matrix.
    """
    shape = ops.shape(x)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"pack_symmetric needs a square matrix, got shape {shape}")
    n = shape[0]
    rows, cols = ops.triu_indices(n, x)
    return ops.gather2d(x, rows, cols)


def unpack_symmetric(ops: ArrayOps, v: Array, n: int) -> Array:
    """Inverse of ``pack_symmetric``: the symmetric n x n matrix of a packed vector.

    Raises:
        ValueError: ``v`` does not hold n(n+1)/2 elements.
    """
    if ops.shape(v) != (packed_size(n),):
        raise ValueError(f"unpack_symmetric: expected {packed_size(n)} elements for n={n}, got shape {ops.shape(v)}")
    rows, cols = ops.triu_indices(n, v)
    return ops.scatter_sym(v, rows, cols, n)


def to_wire(ops: ArrayOps, x: Array, wire_dtype: WireDtype) -> Array:
    """Cast a tensor for sending.

    FLOAT16: cast to float16 (relative error <= ``fp16_relative_error_bound()`` within the fp16
    normal range). FLOAT32: float32 and float64 are sent as they are (float64 stays float64 so
    float64 runs and tests stay exact); float16/bfloat16 are widened to float32.
    """
    if WireDtype(wire_dtype) is WireDtype.FLOAT16:
        return ops.cast(x, "float16")
    return x if ops.dtype_name(x) in ("float32", "float64") else ops.cast(x, "float32")


def from_wire(ops: ArrayOps, x: Array, dtype_name: str) -> Array:
    """Cast a received tensor back to ``dtype_name`` (the statistic's dtype); no-op if equal."""
    return x if ops.dtype_name(x) == dtype_name else ops.cast(x, dtype_name)


def fp16_relative_error_bound() -> float:
    """Relative rounding error of float16 round-to-nearest for normal numbers.

    float16 has an 11-bit significand (10 stored bits), so for |x| in the normal range
    [2^-14, 65504] the unit roundoff gives |fp16(x) - x| <= 2^-11 |x|. Values below 2^-14
    (subnormal) have an absolute error up to 2^-25 instead; values above 65504 overflow.
    """
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
    """Flatten and concatenate tensors of one dtype into a single 1-D buffer.

    Returns:
        The buffer and the layout that ``unfuse`` needs to split it again.
    """
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

    A tensor larger than the threshold gets a bucket of its own; threshold 0 disables fusion
    (one tensor per bucket). Order is kept, so buckets can be fused and unfused in sequence.

    Args:
        sizes_in_bytes: size of each tensor, in order.
        threshold: largest bucket in bytes (>= 0).

    Raises:
        ValueError: a negative threshold or size.
    """
    if threshold < 0 or any(size < 0 for size in sizes_in_bytes):
        raise ValueError(f"bucket: threshold={threshold} and sizes must be >= 0")
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
