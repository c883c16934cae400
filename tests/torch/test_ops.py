"""``TorchOps`` agrees with the numpy reference backend on the methods of the per-step hot path
(the summed gradients behind the finiteness flag, the subnormal flush, unstacking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvd_ngd.ops.base import ArrayOps
from hvd_ngd.ops.numpy_ops import NumpyOps
from hvd_ngd.torch.ops import TorchOps

T, N = TorchOps(), NumpyOps()


def test_protocol() -> None:
    assert isinstance(T, ArrayOps)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_total_sum(bad, dtype) -> None:
    xs = [torch.randn(5, 7, generator=torch.Generator().manual_seed(s)).to(dtype) for s in range(3)]
    xs.append(torch.full((3,), 60000.0, dtype=dtype))  # finite, but its float16 sum overflows
    if bad is not None:
        xs[1][2, 3] = bad
    got = T.total_sum(xs)
    assert got.dim() == 0 and got.dtype in (torch.float32, torch.float64)
    assert np.isfinite(float(got)) == (bad is None)
    expect = N.to_float(N.total_sum([x.double().numpy() for x in xs]))
    if bad is None:
        np.testing.assert_allclose(float(got), expect, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5)
    else:
        assert np.isnan(float(got)) == np.isnan(expect)


def test_total_sum_mixed_dtypes_and_one_tensor() -> None:
    mixed = T.total_sum([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float16)])
    assert mixed.dtype == torch.float64 and float(mixed) == 5.0
    assert float(T.total_sum([torch.tensor([1.0, float("inf")])])) == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flush_tiny_and_unstack_match_numpy(dtype) -> None:
    x = torch.tensor([[1e-31, -1e-31, 2e-30], [-1.0, 0.0, float("nan")]], dtype=dtype)
    np.testing.assert_array_equal(T.flush_tiny(x, 1e-30).numpy(), N.flush_tiny(x.numpy(), 1e-30))
    parts = T.unstack(x)
    assert len(parts) == 2 and all(p.data_ptr() == x[i].data_ptr() for i, p in enumerate(parts))  # views
