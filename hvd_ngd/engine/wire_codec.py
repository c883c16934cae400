"""Wire codec: many statistics into one send buffer and back, with one gather each way.

Symmetric factors travel as their upper triangles (n(n+1)/2 values). For a list of statistics
the codec builds, once per list, one index that picks every upper triangle out of the
concatenated flat factors, and one index that rebuilds every full matrix from the packed
buffer; a step then costs one concatenation and one gather to encode, one gather to decode.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from hvd_ngd import wire
from hvd_ngd.blocks.base import CurvatureBlock
from hvd_ngd.enums import WireDtype
from hvd_ngd.keys import StatKey
from hvd_ngd.ops.base import Array, ArrayOps


def _pack_index(n: int) -> np.ndarray:
    rows, cols = np.triu_indices(n)
    return rows * n + cols


def _unpack_index(n: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    return (lo * n - lo * (lo - 1) // 2 + (hi - lo)).reshape(-1)


class _Layout:
    """Index plan of one list of statistics."""

    def __init__(self, shapes: Sequence[Tuple[int, ...]], packed: Sequence[bool]) -> None:
        self.shapes = list(shapes)
        self.full_sizes = [int(np.prod(s)) for s in shapes]
        self.wire_sizes = [wire.packed_size(s[0]) if p else n for s, p, n in zip(shapes, packed, self.full_sizes)]
        self.any_packed = any(packed)
        pack, unpack = [], []
        full_offset = wire_offset = 0
        for shape, p, full, sent in zip(shapes, packed, self.full_sizes, self.wire_sizes):
            if p:
                pack.append(full_offset + _pack_index(shape[0]))
                unpack.append(wire_offset + _unpack_index(shape[0]))
            else:
                pack.append(full_offset + np.arange(full))
                unpack.append(wire_offset + np.arange(full))
            full_offset += full
            wire_offset += sent
        self.length = wire_offset
        self.pack_np = np.concatenate(pack) if pack else np.zeros(0, np.int64)
        self.unpack_np = np.concatenate(unpack) if unpack else np.zeros(0, np.int64)
        self.pack_index: Array = None
        self.unpack_index: Array = None


class WireCodec:
    """Encodes statistics for collectives (see the module docstring).

    Args:
        ops: array backend.
        blocks: layer name -> block (gives each statistic's shape and symmetry).
        symmetric_packing: send upper triangles of symmetric matrices.
        wire_dtype: element type on the wire (float16 halves the bytes).
    """

    def __init__(self, ops: ArrayOps, blocks: Mapping[str, CurvatureBlock], symmetric_packing: bool, wire_dtype: WireDtype) -> None:
        self.ops = ops
        self.blocks = blocks
        self.symmetric_packing = symmetric_packing
        self.wire_dtype = wire_dtype
        self._layouts: Dict[Tuple[StatKey, ...], _Layout] = {}

    def _layout(self, keys: Tuple[StatKey, ...], like: Array) -> _Layout:
        layout = self._layouts.get(keys)
        if layout is None:
            shapes = [self.blocks[k.layer].shape(k) for k in keys]
            packed = [self.symmetric_packing and self.blocks[k.layer].is_symmetric_matrix(k) for k in keys]
            layout = _Layout(shapes, packed)
            if layout.any_packed:
                layout.pack_index = self.ops.index(layout.pack_np, like)
                layout.unpack_index = self.ops.index(layout.unpack_np, like)
            self._layouts[keys] = layout
        return layout

    def wire_length(self, keys: Sequence[StatKey]) -> int:
        """Elements sent for ``keys``."""
        return sum(self.wire_sizes(keys))

    def wire_sizes(self, keys: Sequence[StatKey]) -> List[int]:
        """Elements sent for each key."""
        out = []
        for k in keys:
            shape = self.blocks[k.layer].shape(k)
            packed = self.symmetric_packing and self.blocks[k.layer].is_symmetric_matrix(k)
            out.append(wire.packed_size(shape[0]) if packed else int(np.prod(shape)))
        return out

    def encode(self, keys: Sequence[StatKey], values: Sequence[Array]) -> Array:
        """One 1-D wire buffer holding ``values`` (the statistics ``keys``), cast for sending."""
        ops = self.ops
        layout = self._layout(tuple(keys), values[0])
        flat = ops.concat([ops.flatten(v) for v in values], 0) if len(values) > 1 else ops.flatten(values[0])
        if layout.any_packed:
            flat = ops.take(flat, layout.pack_index)
        return wire.to_wire(ops, flat, self.wire_dtype)

    def decode(self, keys: Sequence[StatKey], buffer: Array, dtype_name: str) -> List[Array]:
        """The statistics of an ``encode`` buffer (after a collective), in ``dtype_name``."""
        ops = self.ops
        layout = self._layout(tuple(keys), buffer)
        flat = wire.from_wire(ops, buffer, dtype_name)
        if layout.any_packed:
            flat = ops.take(flat, layout.unpack_index)
        out, offset = [], 0
        for shape, n in zip(layout.shapes, layout.full_sizes):
            out.append(ops.reshape(flat[offset : offset + n], shape))
            offset += n
        return out
