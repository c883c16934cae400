"""Factor splitting on real factors of a trained torch CNN (scripts/split_accuracy.py): k = 1 is
exact K-FAC against a dense np.kron solve, and the approximation degrades with k yet stays
closer to K-FAC than the raw gradient at k = 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "split_accuracy.py"


def _script():
    spec = importlib.util.spec_from_file_location("split_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_accuracy_on_trained_factors() -> None:
    torch.set_num_threads(1)
    sa = _script()
    stats = sa.trained_factors(steps=30, images=256)
    damping = 1e-3
    for name, (fa, fg, grad) in stats.items():
        exact = sa.precondition(fa, fg, grad, 1, 1, damping)
        if fa.shape[0] * fg.shape[0] <= 3000:  # dense reference: (A (x) G + l I) vec(P) = vec(V)
            big = np.kron(fa, fg) + damping * np.eye(fa.shape[0] * fg.shape[0])
            dense = np.linalg.solve(big, grad.flatten(order="F")).reshape(grad.shape, order="F")
            np.testing.assert_allclose(exact, dense, rtol=1e-6, atol=1e-8 * np.abs(dense).max())
        cos = [sa.cosine(sa.precondition(fa, fg, grad, min(k, fa.shape[0]), min(k, fg.shape[0]), damping), exact)
               for k in (2, 4, 8)]
        assert cos[0] > cos[1] > cos[2], (name, cos)
        assert cos[0] > sa.cosine(grad, exact), (name, cos)
