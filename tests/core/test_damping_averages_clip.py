"""pi-correction, running averages and KL clipping."""

from __future__ import annotations

import math

import numpy as np

from hvd_ngd.damping import cholesky_damping, pi_correction
from hvd_ngd.kl_clip import kl_clip_scale_from_sum
from hvd_ngd.ops import NumpyOps
from hvd_ngd.running_average import ema

OPS = NumpyOps()


def test_pi_correction() -> None:
    a, g = np.diag([2.0, 4.0]), np.diag([1.0, 1.0, 1.0])
    assert math.isclose(pi_correction(OPS, a, g), math.sqrt(3.0 / 1.0))
    assert math.isclose(pi_correction(OPS, np.array([2.0, 4.0]), g, a_is_diagonal=True), math.sqrt(3.0))
    assert pi_correction(OPS, np.zeros((2, 2)), g) == 1.0
    da, dg = cholesky_damping(OPS, a, g, 0.04, use_pi=True)
    assert math.isclose(da, math.sqrt(3.0) * 0.2) and math.isclose(dg, 0.2 / math.sqrt(3.0))
    assert cholesky_damping(OPS, a, g, 0.04, use_pi=False) == (0.2, 0.2)


def test_ema() -> None:
    new = np.array([1.0, 3.0])
    assert ema(OPS, None, new, 0.9) is new
    np.testing.assert_allclose(ema(OPS, np.array([3.0, 3.0]), new, 0.75), [2.5, 3.0])
    np.testing.assert_array_equal(ema(OPS, np.array([3.0, 3.0]), new, 0.0), new)


def test_kl_clip() -> None:
    vg = float(np.sum(np.array([1.0, 2.0]) * np.array([3.0, 4.0])))  # sum(v*g) = 11
    assert math.isclose(kl_clip_scale_from_sum(vg, lr=0.1, kl_clip=1e-3), math.sqrt(1e-3 / (0.01 * 11)))
    assert kl_clip_scale_from_sum(vg, lr=0.1, kl_clip=10.0) == 1.0
    assert kl_clip_scale_from_sum(0.0, 0.1, 1e-3) == 1.0
    assert kl_clip_scale_from_sum(math.nan, 0.1, 1e-3) == 1.0
