"""Unit-wise (BatchNorm / LayerNorm) 2x2 Fisher blocks against per-channel dense solves."""

from __future__ import annotations

import numpy as np

from hvd_ngd.ops import NumpyOps
from hvd_ngd.unitwise import unitwise_fisher, unitwise_per_sample_grads, unitwise_precondition

OPS = NumpyOps()


def test_blocks_and_solves_match_explicit_loops() -> None:
    rng = np.random.default_rng(1)
    n, c, l, damping = 6, 4, 5, 0.02
    x_hat, g = rng.normal(size=(n, c, l)), rng.normal(size=(n, c, l))
    grad_gamma, grad_beta = rng.normal(size=c), rng.normal(size=c)
    fisher = unitwise_fisher(OPS, x_hat, g, grad_scale=3.0)
    pg, pb = unitwise_precondition(OPS, fisher, grad_gamma, grad_beta, damping)
    for ch in range(c):
        per = np.array([[3 * np.sum(g[i, ch] * x_hat[i, ch]), 3 * np.sum(g[i, ch])] for i in range(n)])
        f = per.T @ per / n
        np.testing.assert_allclose(fisher[ch], [f[0, 0], f[0, 1], f[1, 1]], rtol=1e-12)
        expected = np.linalg.solve(f + damping * np.eye(2), [grad_gamma[ch], grad_beta[ch]])
        np.testing.assert_allclose([pg[ch], pb[ch]], expected, rtol=1e-10)


def test_per_sample_grads_shapes() -> None:
    dg, db = unitwise_per_sample_grads(OPS, np.ones((2, 3, 4)), np.full((2, 3, 4), 0.5))
    np.testing.assert_allclose(dg, np.full((2, 3), 2.0))
    np.testing.assert_allclose(db, np.full((2, 3), 2.0))
