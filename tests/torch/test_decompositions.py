"""Decompositions of real factors that broke float32 LAPACK eigh in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hvd_ngd.blocks.kronecker import scaled_eigh
from hvd_ngd.torch.ops import TorchOps

DATA = Path(__file__).resolve().parent / "data"


def test_dead_unit_factor_decomposes_to_finite_eigenvectors() -> None:
    """The A factor of a 40-layer ReLU MLP's 21st layer (26 of 65 units dead: zero rows): plain
    float32 torch.linalg.eigh on it (scaled to mean eigenvalue 1) returned NaN eigenvectors
    without raising; the shifted decomposition is finite and reconstructs the factor."""
    a = torch.from_numpy(np.load(DATA / "dead_units_a_factor.npy"))
    assert a.dtype == torch.float32 and int((a.abs().sum(1) == 0).sum()) == 26
    vals, vecs = scaled_eigh(TorchOps(), a)
    assert torch.isfinite(vecs).all() and torch.isfinite(vals).all()
    torch.testing.assert_close((vecs * vals) @ vecs.T, a, rtol=1e-4, atol=1e-5)
