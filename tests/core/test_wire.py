"""Wire formats: symmetric packing, fp16 transport, fusion buckets."""

from __future__ import annotations

import numpy as np

from hvd_ngd.enums import WireDtype
from hvd_ngd.ops import NumpyOps
from hvd_ngd.wire import bucket, fp16_relative_error_bound, from_wire, fuse, pack_symmetric, packed_size, to_wire, unfuse, unpack_symmetric

OPS = NumpyOps()


def test_pack_round_trip_every_size() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 65):
        x = rng.normal(size=(n, n))
        x = x + x.T
        packed = pack_symmetric(OPS, x)
        assert packed.shape == (packed_size(n),) == (n * (n + 1) // 2,)
        np.testing.assert_array_equal(unpack_symmetric(OPS, packed, n), x)


def test_fp16_error_bound() -> None:
    x = np.random.default_rng(1).uniform(-100, 100, size=1000)
    wire = to_wire(OPS, x.astype(np.float32), WireDtype.FLOAT16)
    assert wire.dtype == np.float16
    back = from_wire(OPS, wire, "float32")
    assert back.dtype == np.float32
    assert np.all(np.abs(back - x) <= fp16_relative_error_bound() * np.abs(x) + 1e-7)
    assert to_wire(OPS, x, WireDtype.FLOAT32).dtype == np.float64  # float64 stays exact


def test_fuse_round_trip_and_buckets() -> None:
    tensors = [np.arange(6.0).reshape(2, 3), np.array([7.0]), np.ones((2, 2, 2))]
    buf, layout = fuse(OPS, tensors)
    assert buf.shape == (15,)
    for a, b in zip(unfuse(OPS, buf, layout), tensors):
        np.testing.assert_array_equal(a, b)
    assert bucket([10, 10, 10], 25) == [[0, 1], [2]]
    assert bucket([10, 100, 10], 25) == [[0], [1], [2]]
    assert bucket([10, 10], 0) == [[0], [1]]
    assert bucket([], 10) == []
