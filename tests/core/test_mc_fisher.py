"""The Monte-Carlo ("true") Fisher in the core's factor math (numpy only).

Per-sample output gradients of the loss at labels drawn from the model's own predictive
distribution, fed to the core's G factor, must average (over many draws) to the Kronecker
factor of the exact Fisher: computed directly by enumerating every class (cross-entropy) or
from the Gaussian's closed form (squared error), and, for one input, equal to the dense
Fisher block E_y[vec(dW) vec(dW)^T] itself. vec is column-major: vec(g a^T) = kron(a, g).
"""

from __future__ import annotations

import numpy as np

from hvd_ngd import factors
from hvd_ngd.enums import LossFamily
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()
DRAWS = 20000
TOL = 0.03  # relative Frobenius error of a mean of 20000 draws (about 5 standard errors here)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class TwoLayerNet:
    """x -> z1 = W1 x + b1 -> h = tanh(z1) -> f = W2 h + b2 (logits or predictions)."""

    def __init__(self, rng: np.random.Generator, d_in: int = 3, hidden: int = 4, d_out: int = 3) -> None:
        self.w1 = rng.normal(size=(hidden, d_in))
        self.b1 = rng.normal(size=hidden) * 0.1
        self.w2 = rng.normal(size=(d_out, hidden))
        self.b2 = rng.normal(size=d_out) * 0.1

    def forward(self, x: np.ndarray):
        h = np.tanh(x @ self.w1.T + self.b1)
        return h, h @ self.w2.T + self.b2

    def backprop(self, h: np.ndarray, g_f: np.ndarray) -> np.ndarray:
        """Output gradient of layer 1 (w.r.t. z1) from the one w.r.t. f."""
        return (g_f @ self.w2) * (1.0 - h**2)


def softmax(f: np.ndarray) -> np.ndarray:
    e = np.exp(f - f.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sampled_output_grads(family: LossFamily, f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gradient w.r.t. f of the summed loss at one drawn label/target per row."""
    if family is LossFamily.CROSS_ENTROPY:
        p = softmax(f)
        y = (rng.random((len(p), 1)) > np.cumsum(p, 1)).sum(1)  # inverse-CDF draw per row
        return p - np.eye(p.shape[1])[y]
    y = f + np.sqrt(0.5) * rng.normal(size=f.shape)  # (f - y)^2 = NLL of N(f, 1/2) + const
    return 2.0 * (f - y)


def output_fisher(family: LossFamily, f_row: np.ndarray) -> np.ndarray:
    """E_y[g g^T] at one output, directly: sum over every class, or the Gaussian's 2I."""
    if family is LossFamily.CROSS_ENTROPY:
        p = softmax(f_row)
        return sum(p[c] * np.outer(p - np.eye(len(p))[c], p - np.eye(len(p))[c]) for c in range(len(p)))
    return 2.0 * np.eye(len(f_row))


def mc_g_factors(net: TwoLayerNet, x: np.ndarray, family: LossFamily, rng: np.random.Generator):
    """Core G factors (layer 1, layer 2) averaged over DRAWS independent label draws, vectorised
    by stacking the draws as rows (the factor is a mean over rows)."""
    h, f = net.forward(np.repeat(x, DRAWS // len(x), axis=0))
    g_f = sampled_output_grads(family, f, rng)
    g1 = net.backprop(h, g_f)
    return factors.linear_g_factor(OPS, g1, 1.0), factors.linear_g_factor(OPS, g_f, 1.0)


def exact_g_factors(net: TwoLayerNet, x: np.ndarray, family: LossFamily):
    h, f = net.forward(x)
    g2 = np.mean([output_fisher(family, f[n]) for n in range(len(x))], axis=0)
    g1 = np.mean(
        [(net.w2 * (1 - h[n] ** 2)).T @ output_fisher(family, f[n]) @ (net.w2 * (1 - h[n] ** 2)) for n in range(len(x))],
        axis=0,
    )
    return g1, g2


def test_categorical_mc_g_matches_the_exact_fisher_factor() -> None:
    rng = np.random.default_rng(0)
    net = TwoLayerNet(rng)
    x = rng.normal(size=(4, 3))
    mc1, mc2 = mc_g_factors(net, x, LossFamily.CROSS_ENTROPY, rng)
    ex1, ex2 = exact_g_factors(net, x, LossFamily.CROSS_ENTROPY)
    assert rel(mc2, ex2) < TOL and rel(mc1, ex1) < TOL
    # labels that are not the model's own (uniform) estimate another matrix: the test can fail
    h, f = net.forward(np.repeat(x, DRAWS // 4, axis=0))
    uniform = softmax(f) - np.eye(3)[rng.integers(0, 3, len(f))]
    assert rel(factors.linear_g_factor(OPS, uniform, 1.0), ex2) > 5 * TOL


def test_gaussian_mc_g_matches_the_exact_fisher_factor() -> None:
    rng = np.random.default_rng(1)
    net = TwoLayerNet(rng, d_out=2)
    x = rng.normal(size=(4, 3))
    mc1, mc2 = mc_g_factors(net, x, LossFamily.MSE, rng)
    ex1, ex2 = exact_g_factors(net, x, LossFamily.MSE)
    assert rel(mc2, ex2) < TOL and rel(mc1, ex1) < TOL
    np.testing.assert_allclose(ex2, 2.0 * np.eye(2))


def test_one_input_mc_kronecker_block_is_the_dense_fisher() -> None:
    """For one input the Kronecker block A (x) E[G] is the dense Fisher block of the last layer,
    E_y[vec(dW) vec(dW)^T] enumerated over every class (no sampling)."""
    rng = np.random.default_rng(2)
    net = TwoLayerNet(rng)
    x = rng.normal(size=(1, 3))
    h, f = net.forward(x)
    a = np.concatenate([h, np.ones((1, 1))], 1)
    p = softmax(f)[0]
    dense = sum(
        p[c] * np.outer(v, v)
        for c in range(3)
        for v in [np.kron(a[0], p - np.eye(3)[c])]  # vec(g a^T) with the bias column
    )
    a_factor = factors.linear_a_factor(OPS, h, has_bias=True)
    _, mc2 = mc_g_factors(net, x, LossFamily.CROSS_ENTROPY, rng)
    assert rel(np.kron(a_factor, mc2), dense) < TOL
    np.testing.assert_allclose(np.kron(a_factor, output_fisher(LossFamily.CROSS_ENTROPY, f[0])), dense, rtol=1e-12, atol=1e-15)
