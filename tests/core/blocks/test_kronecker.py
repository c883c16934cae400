"""KroneckerBlock and the batched eigen-basis path against dense references."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd.blocks import KroneckerBlock
from hvd_ngd.blocks.kronecker import scaled_eigh
from hvd_ngd.engine.batched import BatchedKronecker
from hvd_ngd.enums import InverseMethod, LayerKind
from hvd_ngd.layer_spec import LayerSpec
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()


def spd(rng, n, scale=1.0, dtype=np.float64):
    x = rng.normal(size=(n, 2 * n))
    return (scale * x @ x.T / (2 * n)).astype(dtype)


def dense_reference(a, g, grad, damping):
    """(A (x) G + damping I)^-1 vec(grad), with vec stacking columns (grad is out x in)."""
    fisher = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    return np.linalg.solve(fisher, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def make(name, n_in, n_out):
    return KroneckerBlock(LayerSpec(name, LayerKind.LINEAR, n_in, n_out, True), InverseMethod.EIGEN, True)


def test_eigen_block_matches_the_dense_damped_kronecker_inverse() -> None:
    rng = np.random.default_rng(0)
    block = make("fc", 4, 3)
    factors = {block.a_key: spd(rng, 5), block.g_key: spd(rng, 3)}
    inverses = {k: block.invert(OPS, k, factors, 0.1) for k in block.inverted}
    grad = rng.normal(size=(3, 5))
    out = block.precondition(OPS, grad, factors, inverses, 0.1)
    np.testing.assert_allclose(out, dense_reference(factors[block.a_key], factors[block.g_key], grad, 0.1), rtol=1e-10)
    again = block.precondition(OPS, grad, factors, inverses, 0.1)  # cached denominator
    np.testing.assert_array_equal(again, out)
    other = block.precondition(OPS, grad, factors, inverses, 0.5)  # a damping change invalidates it
    np.testing.assert_allclose(other, dense_reference(factors[block.a_key], factors[block.g_key], grad, 0.5), rtol=1e-10)


def test_batched_groups_equal_per_layer_preconditioning() -> None:
    rng = np.random.default_rng(1)
    blocks = [make(f"fc{i}", 6, 4) for i in range(5)]
    factors, inverses, damping, grads = {}, {}, {}, []
    for i, b in enumerate(blocks):
        factors[b.a_key], factors[b.g_key] = spd(rng, 7, 10.0**-i), spd(rng, 4, 10.0**i)
        damping[b.name] = 10.0 ** -(i % 3)
        grads.append(rng.normal(size=(4, 7)) * 10.0**-i)
    for b in blocks:
        inverses.update({k: b.invert(OPS, k, factors, damping[b.name]) for k in b.inverted})
    batched = BatchedKronecker()
    outs, vg = batched.precondition(OPS, blocks, grads, inverses, damping)
    for b, g, out, v in zip(blocks, grads, outs, vg):
        ref = dense_reference(factors[b.a_key], factors[b.g_key], g, damping[b.name])
        np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(v, np.sum(ref * g), rtol=1e-9)
    damping["fc2"] = 3.0  # the stacked denominators follow a damping change
    outs2, _ = batched.precondition(OPS, blocks, grads, inverses, damping)
    ref = dense_reference(factors[blocks[2].a_key], factors[blocks[2].g_key], grads[2], 3.0)
    np.testing.assert_allclose(outs2[2], ref, rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-31, 1e-12, 1.0, 1e12])
def test_scaled_eigh_is_exact_at_any_factor_scale(scale: float) -> None:
    """Factors of deep networks with vanishing gradients sit near 1e-31 in float32, where an
    unscaled solver may fail to converge; the scaled decomposition reconstructs them."""
    rng = np.random.default_rng(2)
    x = spd(rng, 24, scale, np.float32)
    vals, vecs = scaled_eigh(OPS, x)
    recon = (vecs * vals) @ vecs.T
    np.testing.assert_allclose(recon, x, rtol=1e-3, atol=1e-5 * scale)
    assert np.all(vals >= 0) and np.isclose(vals.sum(), np.trace(x), rtol=1e-4)


def test_subnormal_gradient_entries_do_not_change_the_result() -> None:
    """Entries below 1e-30 of a layer's largest gradient entry are flushed before the matmuls
    (subnormal floats slow CPU matmuls ~5x); the result differs by less than float32 rounding."""
    rng = np.random.default_rng(3)
    block = make("fc", 8, 6)
    factors = {block.a_key: spd(rng, 9, dtype=np.float32), block.g_key: spd(rng, 6, 1e-20, dtype=np.float32)}
    inverses = {k: block.invert(OPS, k, factors, 1e-3) for k in block.inverted}
    grad = (rng.normal(size=(6, 9)) * 1e-12).astype(np.float32)
    grad[0, :4] = 1e-41  # subnormal in float32
    out = block.precondition(OPS, grad, factors, inverses, 1e-3)
    ref = dense_reference(factors[block.a_key].astype(np.float64), factors[block.g_key].astype(np.float64), grad.astype(np.float64), 1e-3)
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=1e-6 * np.abs(ref).max())
    assert out.dtype == np.float32
