"""``TFOps`` agrees with the numpy reference backend method by method, and the core's math
(factors, wire packing, inverses, preconditioning) gives the same result on both."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd import factors, inverse, unitwise, wire  # noqa: E402
from hvd_ngd.enums import InverseMethod  # noqa: E402
from hvd_ngd.ops.base import ArrayOps  # noqa: E402
from hvd_ngd.ops.numpy_ops import NumpyOps  # noqa: E402
from hvd_ngd.tensorflow.ops import TFOps  # noqa: E402

T, N = TFOps(), NumpyOps()


def spd(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


def test_protocol() -> None:
    assert isinstance(T, ArrayOps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_methods_match_numpy(dtype) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 4)).astype(dtype)
    tx = T.from_numpy(x)
    tol = dict(rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6 if dtype == np.float32 else 1e-12)
    assert T.dtype_name(tx) == N.dtype_name(x) == np.dtype(dtype).name
    assert T.shape(tx) == (4, 4)
    assert T.dtype_name(T.cast(tx, "float16")) == "float16"
    for name in ("transpose", "flatten", "diag", "trace", "sqrt", "abs", "frobenius_norm"):
        arg = np.abs(x) if name == "sqrt" else x
        np.testing.assert_allclose(T.to_numpy(getattr(T, name)(T.from_numpy(arg))), getattr(N, name)(arg), **tol)
    np.testing.assert_allclose(T.to_numpy(T.diag(T.from_numpy(x[0]))), np.diag(x[0]), **tol)
    np.testing.assert_allclose(T.to_numpy(T.matmul(tx, tx)), x @ x, **tol)
    np.testing.assert_allclose(T.to_numpy(T.sum(tx, axis=0)), x.sum(0), **tol)
    np.testing.assert_allclose(T.to_float(T.sum(tx)), float(x.sum()), **tol)
    np.testing.assert_allclose(T.to_numpy(T.maximum(tx, 0.1)), np.maximum(x, 0.1), **tol)
    np.testing.assert_allclose(T.to_numpy(T.reshape(tx, (2, 8))), x.reshape(2, 8))
    np.testing.assert_allclose(T.to_numpy(T.concat([tx, tx], 1)), np.concatenate([x, x], 1))
    np.testing.assert_allclose(T.to_numpy(T.stack([tx, tx], 0)), np.stack([x, x], 0))
    np.testing.assert_array_equal(T.to_numpy(T.zeros((2, 3), tx)), np.zeros((2, 3), dtype))
    np.testing.assert_array_equal(T.to_numpy(T.ones((2,), tx)), np.ones((2,), dtype))
    np.testing.assert_array_equal(T.to_numpy(T.eye(3, tx)), np.eye(3, dtype=dtype))
    assert T.all_finite(tx) and not T.all_finite(tx * np.nan)
    for bad in (None, np.nan, np.inf, -np.inf):
        xs = [x, x[:2].copy()]
        if bad is not None:
            xs[1][1, 2] = bad
        expect = N.to_float(N.total_sum(xs))
        assert np.isfinite(expect) == (bad is None)
        got = T.to_float(T.total_sum([T.from_numpy(a) for a in xs]))
        assert np.isfinite(got) == (bad is None) and (np.isnan(got) == np.isnan(expect))
        if bad is None:
            np.testing.assert_allclose(got, expect, rtol=1e-5)
    np.testing.assert_array_equal([T.to_numpy(a) for a in T.unstack(tx)], N.unstack(x))
    tiny = np.array([1e-31, -1e-31, 2e-30, -1.0, 0.0], dtype)
    np.testing.assert_array_equal(T.to_numpy(T.flush_tiny(T.from_numpy(tiny), 1e-30)), N.flush_tiny(tiny, 1e-30))
    rows, cols = T.triu_indices(4, tx)
    nr, nc = N.triu_indices(4, x)
    np.testing.assert_array_equal(T.to_numpy(rows), nr)
    np.testing.assert_array_equal(T.to_numpy(cols), nc)
    vals = T.gather2d(tx, rows, cols)
    np.testing.assert_array_equal(T.to_numpy(vals), x[nr, nc])
    np.testing.assert_array_equal(T.to_numpy(T.scatter_sym(vals, rows, cols, 4)), N.scatter_sym(x[nr, nc], nr, nc, 4))
    ids = np.array([[0, 3], [3, 9]])  # 9 is out of range and dropped
    np.testing.assert_array_equal(T.to_numpy(T.bincount(T.from_numpy(ids), 5, tx)), N.bincount(ids, 5, x))
    s = spd(5, 1).astype(dtype)
    w, v = T.eigh(T.from_numpy(s))
    nw, _ = N.eigh(s)
    np.testing.assert_allclose(T.to_numpy(w), nw, rtol=1e-5 if dtype == np.float32 else 1e-10)
    recon = T.to_numpy(v) @ np.diag(T.to_numpy(w)) @ T.to_numpy(v).T
    np.testing.assert_allclose(recon, s, rtol=1e-4 if dtype == np.float32 else 1e-10)
    inv = T.to_numpy(T.cholesky_inverse(T.from_numpy(s)))
    np.testing.assert_allclose(inv, N.cholesky_inverse(s), rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_cholesky_inverse_raises_on_indefinite() -> None:
    with pytest.raises(Exception):
        T.cholesky_inverse(T.from_numpy(-np.eye(3)))


@pytest.mark.parametrize("method", [InverseMethod.EIGEN, InverseMethod.CHOLESKY])
def test_core_math_on_tf_equals_numpy(method: InverseMethod) -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(7, 4))
    g = rng.normal(size=(7, 3))
    fa_t = factors.linear_a_factor(T, T.from_numpy(a), True)
    fa_n = factors.linear_a_factor(N, a, True)
    np.testing.assert_allclose(T.to_numpy(fa_t), fa_n, rtol=1e-12)
    fg_t, fg_n = factors.linear_g_factor(T, T.from_numpy(g), 7.0), factors.linear_g_factor(N, g, 7.0)
    np.testing.assert_allclose(T.to_numpy(fg_t), fg_n, rtol=1e-12)
    packed = wire.pack_symmetric(T, fa_t)
    np.testing.assert_allclose(T.to_numpy(wire.unpack_symmetric(T, packed, 5)), fa_n, rtol=1e-12)
    grad = rng.normal(size=(3, 5))
    inv_a_t = inverse.invert_factor(T, fa_t, method, 0.1)
    inv_g_t = inverse.invert_factor(T, fg_t, method, 0.1)
    inv_a_n = inverse.invert_factor(N, fa_n, method, 0.1)
    inv_g_n = inverse.invert_factor(N, fg_n, method, 0.1)
    out_t = inverse.precondition_kronecker(T, T.from_numpy(grad), inv_a_t, inv_g_t, 0.01)
    out_n = inverse.precondition_kronecker(N, grad, inv_a_n, inv_g_n, 0.01)
    np.testing.assert_allclose(T.to_numpy(out_t), out_n, rtol=1e-9, atol=1e-12)
    x_hat, gs = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))
    f_t = unitwise.unitwise_fisher(T, T.from_numpy(x_hat), T.from_numpy(gs), 6.0)
    f_n = unitwise.unitwise_fisher(N, x_hat, gs, 6.0)
    np.testing.assert_allclose(T.to_numpy(f_t), f_n, rtol=1e-12)
