"""Wire formats: symmetric packing, fp16 transport, fusion buckets."""

from __future__ import annotations

import numpy as np
import pytest

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
        x32 = x.astype(np.float32)
        assert unpack_symmetric(OPS, pack_symmetric(OPS, x32), n).dtype == np.float32


def test_pack_layout_is_row_major_upper_triangle() -> None:
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    np.testing.assert_array_equal(pack_symmetric(OPS, x), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    with pytest.raises(ValueError, match="square"):
        pack_symmetric(OPS, np.ones((2, 3)))
    with pytest.raises(ValueError, match="expected 6 elements"):
        unpack_symmetric(OPS, np.ones(5), 3)


def test_fp16_error_bound() -> None:
    x = np.random.default_rng(1).uniform(-100, 100, size=1000)
    wire = to_wire(OPS, x.astype(np.float32), WireDtype.FLOAT16)
    assert wire.dtype == np.float16
    back = from_wire(OPS, wire, "float32")
    assert back.dtype == np.float32
    assert np.all(np.abs(back - x) <= fp16_relative_error_bound() * np.abs(x) + 1e-7)
    assert to_wire(OPS, x, WireDtype.FLOAT32).dtype == np.float64  # float64 stays exact
    assert to_wire(OPS, x, WireDtype.FLOAT32) is x


def test_fp16_bound_holds_and_is_tight_over_the_normal_range() -> None:
    rng = np.random.default_rng(2)
    x = np.exp(rng.uniform(np.log(2.0**-14), np.log(65000.0), size=100_000)) * rng.choice([-1.0, 1.0], size=100_000)
    back = from_wire(OPS, to_wire(OPS, x, "float16"), "float64")
    rel = np.abs(back - x) / np.abs(x)
    assert rel.max() <= fp16_relative_error_bound() == 2.0**-11
    assert rel.max() > 0.9 * fp16_relative_error_bound()  # the bound is not loose


def test_float32_wire_widens_half_precision() -> None:
    half = np.ones(4, dtype=np.float16)
    assert to_wire(OPS, half, WireDtype.FLOAT32).dtype == np.float32
    assert to_wire(OPS, half.astype(np.float32), "float32").dtype == np.float32
    assert from_wire(OPS, half, "float16") is half


def test_fuse_round_trip_of_mixed_shapes() -> None:
    rng = np.random.default_rng(3)
    tensors = [rng.normal(size=s) for s in [(2, 3), (1,), (2, 2, 2), (), (0, 4), (5, 1)]]
    buf, layout = fuse(OPS, tensors)
    assert buf.shape == (6 + 1 + 8 + 1 + 0 + 5,)
    assert layout.sizes() == [6, 1, 8, 1, 0, 5]
    out = unfuse(OPS, buf, layout)
    assert len(out) == len(tensors)
    for a, b in zip(out, tensors):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_buckets() -> None:
    assert bucket([10, 10, 10], 25) == [[0, 1], [2]]
    assert bucket([10, 10, 5], 25) == [[0, 1, 2]]  # exactly at the threshold
    assert bucket([10, 100, 10], 25) == [[0], [1], [2]]  # a large tensor gets its own bucket
    assert bucket([100, 10, 10], 25) == [[0], [1, 2]]
    assert bucket([10, 10], 0) == [[0], [1]]
    assert bucket([], 10) == []
    sizes = np.random.default_rng(4).integers(1, 100, size=200).tolist()
    buckets = bucket(sizes, 150)
    assert [i for b in buckets for i in b] == list(range(200))
    assert all(sum(sizes[i] for i in b) <= 150 for b in buckets)
    for first, second in zip(buckets, buckets[1:]):  # greedy: the next tensor did not fit
        assert sum(sizes[i] for i in first) + sizes[second[0]] > 150
    with pytest.raises(ValueError, match="threshold"):
        bucket([1], -1)
