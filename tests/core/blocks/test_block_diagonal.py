"""Factor splitting against dense references built directly with numpy (np.kron, solve)."""

from __future__ import annotations

import numpy as np
import pytest

from hvd_ngd.blocks import (
    BlockLayout,
    block_gram,
    block_layout,
    extract_blocks,
    invert_blocks,
    precondition_block_kronecker,
)
from hvd_ngd.enums import InverseMethod
from hvd_ngd.inverse import invert_factor, precondition_kronecker
from hvd_ngd.ops import NumpyOps

OPS = NumpyOps()


def _spd(rng: np.random.Generator, n: int, samples: int = 50) -> np.ndarray:
    x = rng.normal(size=(samples, n)) @ rng.normal(size=(n, n))
    return x.T @ x / samples


def _dense_block_diagonal(factor: np.ndarray, sizes) -> np.ndarray:
    """Zero every entry outside the diagonal blocks (the reference approximation)."""
    mask = np.zeros_like(factor, dtype=bool)
    start = 0
    for s in sizes:
        mask[start : start + s, start : start + s] = True
        start += s
    return np.where(mask, factor, 0.0)


def _dense_precondition(a: np.ndarray, g: np.ndarray, v: np.ndarray, damping: float) -> np.ndarray:
    """(A (x) G + damping I)^-1 vec(V) with column-major vec, (A (x) G) vec(V) = vec(G V A)."""
    big = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    return np.linalg.solve(big, v.flatten(order="F")).reshape(v.shape, order="F")


def test_layouts() -> None:
    lay = block_layout(10, 3)
    assert lay.sizes == (4, 3, 3) and lay.offsets == (0, 4, 7) and lay.k == 3 and lay.kept_elements == 34
    assert [(s.start, s.stop) for s in lay.slices()] == [(0, 4), (4, 7), (7, 10)]
    assert block_layout(7, 1).sizes == (7,) and block_layout(5, 5).sizes == (1,) * 5
    for n, k in ((4608, 7), (2049, 4), (13, 13)):
        lay = block_layout(n, k)
        assert sum(lay.sizes) == n and max(lay.sizes) - min(lay.sizes) <= 1
    for n, k, match in ((4, 5, "1 <= k <= 4"), (4, 0, "1 <= k"), (0, 1, "n=0"), (4, 2.0, "int")):
        with pytest.raises(ValueError, match=match):
            block_layout(n, k)
    with pytest.raises(ValueError, match="sum to n"):
        BlockLayout(5, (2, 2))


def test_dense_reference_convention() -> None:
    rng = np.random.default_rng(0)
    a, g, v = _spd(rng, 3), _spd(rng, 2), rng.normal(size=(2, 3))
    np.testing.assert_allclose(np.kron(a, g) @ v.flatten(order="F"), (g @ v @ a).flatten(order="F"))


@pytest.mark.parametrize("method", list(InverseMethod))
@pytest.mark.parametrize("ka,kg", [(1, 1), (3, 1), (1, 2), (4, 3), (7, 5)])
def test_block_preconditioning_matches_dense_block_diagonal(method: InverseMethod, ka: int, kg: int) -> None:
    rng = np.random.default_rng(ka * 10 + kg)
    a, g = _spd(rng, 11), _spd(rng, 7)
    v = rng.normal(size=(7, 11))
    damping = 0.05
    a_lay, g_lay = block_layout(11, ka), block_layout(7, kg)
    a_bd, g_bd = _dense_block_diagonal(a, a_lay.sizes), _dense_block_diagonal(g, g_lay.sizes)
    if method is InverseMethod.EIGEN:
        a_inv = invert_blocks(OPS, extract_blocks(OPS, a, a_lay), method)
        g_inv = invert_blocks(OPS, extract_blocks(OPS, g, g_lay), method)
        expected = _dense_precondition(a_bd, g_bd, v, damping)
        got = precondition_block_kronecker(OPS, v, a_lay, a_inv, g_lay, g_inv, damping)
    else:
        da, dg = 0.3, 0.2  # a damping split as cholesky_damping would give
        a_inv = invert_blocks(OPS, extract_blocks(OPS, a, a_lay), method, da)
        g_inv = invert_blocks(OPS, extract_blocks(OPS, g, g_lay), method, dg)
        expected = _dense_precondition(a_bd + da * np.eye(11), g_bd + dg * np.eye(7), v, 0.0)
        got = precondition_block_kronecker(OPS, v, a_lay, a_inv, g_lay, g_inv, damping)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    if ka > 1:  # splitting is an approximation: it differs from the full factor's result
        full = _dense_precondition(a, g, v, damping) if method is InverseMethod.EIGEN else None
        if full is not None:
            assert np.linalg.norm(got - full) > 1e-6 * np.linalg.norm(full)


@pytest.mark.parametrize("method", list(InverseMethod))
def test_one_block_is_todays_result_bit_for_bit(method: InverseMethod) -> None:
    rng = np.random.default_rng(3)
    a, g, v = _spd(rng, 9).astype(np.float32), _spd(rng, 6).astype(np.float32), rng.normal(size=(6, 9)).astype(np.float32)
    share = 0.1 if method is InverseMethod.CHOLESKY else 0.0
    today = precondition_kronecker(OPS, v, invert_factor(OPS, a, method, share), invert_factor(OPS, g, method, share), 0.01)
    a_lay, g_lay = block_layout(9, 1), block_layout(6, 1)
    got = precondition_block_kronecker(
        OPS, v, a_lay, invert_blocks(OPS, extract_blocks(OPS, a, a_lay), method, share),
        g_lay, invert_blocks(OPS, extract_blocks(OPS, g, g_lay), method, share), 0.01,
    )
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, today)


@pytest.mark.parametrize("method", list(InverseMethod))
def test_diagonal_a_factor_blocks(method: InverseMethod) -> None:
    """An Embedding's diagonal A cut into slices, with a split G."""
    rng = np.random.default_rng(4)
    a_vec, g, v = rng.uniform(0.1, 1.0, size=8), _spd(rng, 6), rng.normal(size=(6, 8))
    a_lay, g_lay = block_layout(8, 3), block_layout(6, 2)
    share = 0.2 if method is InverseMethod.CHOLESKY else 0.0
    a_inv = invert_blocks(OPS, extract_blocks(OPS, a_vec, a_lay, diagonal=True), method, share, diagonal=True)
    g_inv = invert_blocks(OPS, extract_blocks(OPS, g, g_lay), method, share)
    g_bd = _dense_block_diagonal(g, g_lay.sizes)
    damping = 0.05 if method is InverseMethod.EIGEN else 0.0
    expected = _dense_precondition(np.diag(a_vec) + share * np.eye(8), g_bd + share * np.eye(6), v, damping)
    got = precondition_block_kronecker(OPS, v, a_lay, a_inv, g_lay, g_inv, 0.05)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_block_gram_is_the_diagonal_blocks_of_the_gram() -> None:
    x = np.random.default_rng(5).normal(size=(20, 10))
    lay = block_layout(10, 3)
    for got, want in zip(block_gram(OPS, x, lay, 0.5), extract_blocks(OPS, x.T @ x * 0.5, lay)):
        np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError, match="10 columns"):
        block_gram(OPS, x, block_layout(9, 3))


def test_mismatches_are_rejected() -> None:
    rng = np.random.default_rng(6)
    a, g, v = _spd(rng, 4), _spd(rng, 3), rng.normal(size=(3, 4))
    with pytest.raises(ValueError, match="does not match the block layout"):
        extract_blocks(OPS, a, block_layout(5, 2))
    a_lay, g_lay = block_layout(4, 2), block_layout(3, 1)
    a_inv = invert_blocks(OPS, extract_blocks(OPS, a, a_lay), InverseMethod.EIGEN)
    g_inv = invert_blocks(OPS, extract_blocks(OPS, g, g_lay), InverseMethod.EIGEN)
    with pytest.raises(ValueError, match="3x4 does not match"):
        precondition_block_kronecker(OPS, v, g_lay, g_inv, a_lay, a_inv, 0.1)
    with pytest.raises(ValueError, match="1 A and 1 G inverses"):
        precondition_block_kronecker(OPS, v, a_lay, a_inv[:1], g_lay, g_inv, 0.1)
    chol = invert_blocks(OPS, extract_blocks(OPS, g, g_lay), InverseMethod.CHOLESKY, 0.1)
    with pytest.raises(ValueError, match="different methods"):
        precondition_block_kronecker(OPS, v, a_lay, a_inv, g_lay, chol, 0.1)


def test_pi_correction_from_blocks_equals_the_full_factors() -> None:
    from hvd_ngd.blocks import blocks_mean_eigenvalue, pi_correction_blocks
    from hvd_ngd.damping import pi_correction

    rng = np.random.default_rng(7)
    a, g, a_vec = _spd(rng, 10), _spd(rng, 6), rng.uniform(0.5, 2.0, size=10)
    la, lg = block_layout(10, 3), block_layout(6, 2)
    a_b, g_b = extract_blocks(OPS, a, la), extract_blocks(OPS, g, lg)
    assert blocks_mean_eigenvalue(OPS, a_b) == pytest.approx(np.trace(a) / 10)
    assert pi_correction_blocks(OPS, a_b, g_b) == pytest.approx(pi_correction(OPS, a, g))
    v_b = extract_blocks(OPS, a_vec, la, diagonal=True)
    assert pi_correction_blocks(OPS, v_b, g_b, True) == pytest.approx(pi_correction(OPS, a_vec, g, True))
    assert pi_correction_blocks(OPS, [np.zeros((2, 2))], g_b) == 1.0
