"""The wire codec packs many statistics with one gather and restores them exactly."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd import wire
from hvd_ngd.blocks import make_block
from hvd_ngd.engine.wire_codec import WireCodec
from hvd_ngd.enums import InverseMethod, LayerKind, WireDtype
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps


class GatherCounting(NumpyOps):
    takes = 0

    def take(self, x, indices):
        GatherCounting.takes += 1
        return super().take(x, indices)


SPECS = [
    LayerSpec("fc", LayerKind.LINEAR, 4, 3, True),
    LayerSpec("emb", LayerKind.EMBEDDING, 6, 2, False),
    LayerSpec("bn", LayerKind.BATCHNORM, 5, 5, True),
]


@pytest.mark.parametrize("packing", [True, False])
def test_roundtrip_and_one_gather_each_way(packing: bool) -> None:
    ops = GatherCounting()
    blocks = {s.name: make_block(s, InverseMethod.EIGEN, True) for s in SPECS}
    codec = WireCodec(ops, blocks, packing, WireDtype.FLOAT32)
    rng = np.random.default_rng(0)
    keys, values = [], []
    for b in blocks.values():
        for k in b.statistics:
            x = rng.normal(size=b.shape(k))
            if b.is_symmetric_matrix(k):
                x = x + x.T
            keys.append(k)
            values.append(x)
    GatherCounting.takes = 0
    buf = codec.encode(keys, values)
    expected_len = sum(
        wire.packed_size(v.shape[0]) if packing and blocks[k.layer].is_symmetric_matrix(k) else v.size for k, v in zip(keys, values)
    )
    assert buf.shape == (expected_len,) == (codec.wire_length(keys),)
    if packing:  # the first matrix's upper triangle leads the buffer, as wire.pack_symmetric gives it
        np.testing.assert_array_equal(buf[: wire.packed_size(5)], wire.pack_symmetric(ops, values[0]))
    out = codec.decode(keys, buf, "float64")
    for v, o in zip(values, out):
        np.testing.assert_array_equal(o, v)
    assert GatherCounting.takes == (2 if packing else 0)


def test_float16_wire_halves_bytes_and_bounds_the_error() -> None:
    ops = NumpyOps()
    blocks = {s.name: make_block(s, InverseMethod.EIGEN, True) for s in SPECS[:1]}
    codec = WireCodec(ops, blocks, True, WireDtype.FLOAT16)
    b = blocks["fc"]
    x = np.random.default_rng(1).normal(size=(5, 5)).astype(np.float32)
    x = x + x.T
    buf = codec.encode([b.a_key], [x])
    assert buf.dtype == np.float16
    (back,) = codec.decode([b.a_key], buf, "float32")
    np.testing.assert_allclose(back, x, rtol=wire.fp16_relative_error_bound() * 1.01, atol=1e-7)
