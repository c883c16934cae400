"""Decompositions run in at least float32; eigenvalues are clamped; round trips to tensors."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import inverse_from_tensors, inverse_to_tensors, invert_factor, precondition_kronecker
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()


@pytest.mark.parametrize("dtype,expected", [("float16", "float32"), ("float32", "float32"), ("float64", "float64")])
def test_decomposition_dtype(dtype: str, expected: str) -> None:
    x = np.random.default_rng(0).normal(size=(5, 5))
    factor = (x @ x.T).astype(dtype)
    inv = invert_factor(OPS, factor, InverseMethod.EIGEN)
    assert inv.eigvals.dtype == np.dtype(expected) and inv.eigvecs.dtype == np.dtype(expected)
    chol = invert_factor(OPS, factor, InverseMethod.CHOLESKY, 0.1)
    assert chol.inverse.dtype == np.dtype(expected)


def test_eigenvalues_clamped_and_result_keeps_grad_dtype() -> None:
    factor = np.diag([1.0, -1e-9, 2.0])  # a slightly indefinite factor from rounding
    inv = invert_factor(OPS, factor, InverseMethod.EIGEN)
    assert inv.eigvals.min() >= 0.0
    grad = np.ones((3, 3), dtype=np.float32)
    out = precondition_kronecker(OPS, grad, inv, invert_factor(OPS, np.eye(3), InverseMethod.EIGEN), 0.1)
    assert out.dtype == np.float32


@pytest.mark.parametrize("method", list(InverseMethod))
@pytest.mark.parametrize("diagonal", [False, True])
def test_tensor_round_trip(method: InverseMethod, diagonal: bool) -> None:
    factor = np.array([1.0, 2.0, 3.0]) if diagonal else np.diag([1.0, 2.0, 3.0])
    inv = invert_factor(OPS, factor, method, 0.5, diagonal=diagonal)
    back = inverse_from_tensors(OPS, method, diagonal, inverse_to_tensors(inv))
    for a, b in zip(inverse_to_tensors(inv), inverse_to_tensors(back)):
        np.testing.assert_array_equal(a, b)
