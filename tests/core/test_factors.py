"""Kronecker factors and preconditioning against dense empirical Fisher blocks (float64).

vec is column-major throughout: vec(g a^T) = kron(a, g), so F = E[vec(dW) vec(dW)^T] and a
K-FAC block is kron(A, G)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hvd_ngd import factors
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import invert_factor, precondition_kronecker
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()
RNG = np.random.default_rng(0)
DAMPING = 0.03


def vec(m: np.ndarray) -> np.ndarray:
    return m.reshape(-1, order="F")


def dense_fisher(per_sample_grads: np.ndarray) -> np.ndarray:
    """E_n[vec(dW_n) vec(dW_n)^T] from per-sample gradient matrices (N, out, in)."""
    v = np.stack([vec(g) for g in per_sample_grads])
    return v.T @ v / len(v)


def with_ones(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """Independent 'valid' im2col: (N, L, C*k*k) in (c, i, j) order."""
    n, c, h, w = x.shape
    cols = []
    for i in range(h - k + 1):
        for j in range(w - k + 1):
            cols.append(x[:, :, i : i + k, j : j + k].reshape(n, -1))
    return np.stack(cols, 1)


def precondition(a, g, grad, method, diagonal=False):
    if method is InverseMethod.EIGEN:
        ai = invert_factor(OPS, a, method, diagonal=diagonal)
        gi = invert_factor(OPS, g, method)
    else:
        ta = np.sum(a) / a.shape[0] if diagonal else np.trace(a) / a.shape[0]
        pi = math.sqrt(ta / (np.trace(g) / g.shape[0]))
        ai = invert_factor(OPS, a, method, pi * math.sqrt(DAMPING), diagonal=diagonal)
        gi = invert_factor(OPS, g, method, math.sqrt(DAMPING) / pi)
    return precondition_kronecker(OPS, grad, ai, gi, DAMPING)


def expected_solve(a, g, grad, method, diagonal=False):
    a_mat = np.diag(a) if diagonal else a
    if method is InverseMethod.EIGEN:
        f = np.kron(a_mat, g) + DAMPING * np.eye(a_mat.shape[0] * g.shape[0])
    else:
        pi = math.sqrt((np.trace(a_mat) / a_mat.shape[0]) / (np.trace(g) / g.shape[0]))
        s = math.sqrt(DAMPING)
        f = np.kron(a_mat + pi * s * np.eye(a_mat.shape[0]), g + s / pi * np.eye(g.shape[0]))
    return np.linalg.solve(f, vec(grad)).reshape(grad.shape, order="F")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_single_sample_is_exact_and_kron_matches_loops(bias: bool) -> None:
    a, g = RNG.normal(size=(1, 4)), RNG.normal(size=(1, 3))
    aa = with_ones(a) if bias else a
    A, G = factors.linear_a_factor(OPS, a, bias), factors.linear_g_factor(OPS, g)
    per_sample = np.stack([np.outer(g[0], aa[0])])
    np.testing.assert_allclose(np.kron(A, G), dense_fisher(per_sample), rtol=1e-12)
    a, g = RNG.normal(size=(7, 4)), RNG.normal(size=(7, 3))
    aa = with_ones(a) if bias else a
    A, G = factors.linear_a_factor(OPS, a, bias), factors.linear_g_factor(OPS, g, grad_scale=2.0)
    a_loop = sum(np.outer(r, r) for r in aa) / 7
    g_loop = sum(np.outer(2 * r, 2 * r) for r in g) / 7
    np.testing.assert_allclose(np.kron(A, G), np.kron(a_loop, g_loop), rtol=1e-12)


def test_conv2d_factors_against_dense_fisher_and_loops() -> None:
    x, w_out = RNG.normal(size=(1, 2, 3, 3)), 3
    patches = im2col(x, 3)  # one output location: L = 1
    g = RNG.normal(size=(1, 1, w_out))
    A = factors.conv2d_a_factor(OPS, patches, True)
    G = factors.conv2d_g_factor(OPS, g)
    per_sample = np.stack([np.outer(g[0, 0], with_ones(patches)[0, 0])])
    np.testing.assert_allclose(np.kron(A, G), dense_fisher(per_sample), rtol=1e-12)
    x = RNG.normal(size=(5, 2, 4, 4))
    patches = im2col(x, 3)  # L = 4
    g = RNG.normal(size=(5, 4, w_out))
    A = factors.conv2d_a_factor(OPS, patches, False)
    G = factors.conv2d_g_factor(OPS, g, grad_scale=5.0)
    a_loop = sum(np.outer(patches[n, l], patches[n, l]) for n in range(5) for l in range(4)) / 20
    g_loop = sum(np.outer(5 * g[n, l], 5 * g[n, l]) for n in range(5) for l in range(4)) / 5
    np.testing.assert_allclose(A, a_loop, rtol=1e-12)
    np.testing.assert_allclose(G, g_loop, rtol=1e-12)


def test_embedding_a_is_token_frequencies() -> None:
    ids = np.array([[0, 3, 3], [1, 3, 0]])
    a = factors.embedding_a_factor(OPS, ids, 5, np.zeros(1))
    onehot = np.eye(5)[ids.reshape(-1)]
    np.testing.assert_allclose(np.diag(a), onehot.T @ onehot / 6, rtol=1e-12)


@pytest.mark.parametrize("method", list(InverseMethod))
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_preconditioned_gradient_equals_dense_solve(method: InverseMethod, kind: str) -> None:
    if kind == "linear":
        a = factors.linear_a_factor(OPS, RNG.normal(size=(9, 4)), True)
        g = factors.linear_g_factor(OPS, RNG.normal(size=(9, 3)))
    elif kind == "conv":
        a = factors.conv2d_a_factor(OPS, im2col(RNG.normal(size=(4, 2, 4, 4)), 3), True)
        g = factors.conv2d_g_factor(OPS, RNG.normal(size=(4, 4, 3)), 4.0)
    else:
        a = factors.embedding_a_factor(OPS, RNG.integers(0, 6, size=(8, 2)), 6, np.zeros(1))
        g = factors.embedding_g_factor(OPS, RNG.normal(size=(16, 3)))
    diagonal = kind == "embedding"
    grad = RNG.normal(size=(g.shape[0], a.shape[0]))
    got = precondition(a, g, grad, method, diagonal)
    np.testing.assert_allclose(got, expected_solve(a, g, grad, method, diagonal), rtol=1e-6, atol=1e-10)
