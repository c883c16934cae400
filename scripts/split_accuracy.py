#!/usr/bin/env python3
"""Accuracy cost of factor splitting on real factors: a CNN on scikit-learn's digits.

    PYTHONPATH=. .venv/bin/python scripts/split_accuracy.py [--steps 60] [--out docs/split_accuracy.md]

Trains Conv(1->32) - Conv(32->64) - Linear(1024->256) - Linear(256->10) with SGD for ``--steps``
steps, then captures the K-FAC factors (``hvd_ngd.factors`` conventions, on numpy) and the
gradient of the mean loss on 1,024 training images. For every layer and k, it preconditions the
gradient with A and G cut into k diagonal blocks each (``hvd_ngd.blocks``), k = 1 being exact
K-FAC, and prints the relative error ||P_k - P_1|| / ||P_1|| and the cosine to P_1, next to the
cosine of the raw gradient to P_1 (what no curvature at all gives). Damping as in the engine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvd_ngd import factors  # noqa: E402
from hvd_ngd.blocks import block_layout, extract_blocks, invert_blocks, precondition_block_kronecker  # noqa: E402
from hvd_ngd.enums import InverseMethod  # noqa: E402
from hvd_ngd.ops import NumpyOps  # noqa: E402

OPS = NumpyOps()


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """layer -> (A, G, gradient matrix (out, a_dim)) of the mean cross-entropy on (x, y)."""
    inputs, outputs = {}, {}
    hooks = []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, mod in layers.items():
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0].detach())))
        hooks.append(mod.register_full_backward_hook(lambda m, gi, go, n=name: outputs.__setitem__(n, go[0].detach())))
    model.zero_grad()
    x = x.clone().requires_grad_(True)  # so the first layer's full backward hook sees its output gradient
    nn.functional.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    out = {}
    batch = x.shape[0]
    for name, mod in layers.items():
        a, g = inputs[name], outputs[name]
        if isinstance(mod, nn.Conv2d):
            patches = nn.functional.unfold(a, mod.kernel_size, padding=mod.padding).transpose(1, 2).double().numpy()
            gl = g.flatten(2).transpose(1, 2).double().numpy()
            fa = factors.conv2d_a_factor(OPS, patches, True)
            fg = factors.conv2d_g_factor(OPS, gl, grad_scale=batch)
            grad = mod.weight.grad.flatten(1)
        else:
            fa = factors.linear_a_factor(OPS, a.double().numpy(), True)
            fg = factors.linear_g_factor(OPS, g.double().numpy(), grad_scale=batch)
            grad = mod.weight.grad
        grad = torch.cat([grad, mod.bias.grad[:, None]], 1).double().numpy()
        out[name] = (fa, fg, grad)
    return out


def trained_factors(steps: int, images: int = 1024) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``capture`` on the first ``images`` digits after ``steps`` SGD steps from seed 0."""
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy((x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    y = torch.from_numpy(y)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return capture(model, x[:images], y[:images])


def precondition(fa: np.ndarray, fg: np.ndarray, grad: np.ndarray, ka: int, kg: int, damping: float) -> np.ndarray:
    la, lg = block_layout(fa.shape[0], ka), block_layout(fg.shape[0], kg)
    a_inv = invert_blocks(OPS, extract_blocks(OPS, fa, la), InverseMethod.EIGEN)
    g_inv = invert_blocks(OPS, extract_blocks(OPS, fg, lg), InverseMethod.EIGEN)
    return precondition_block_kronecker(OPS, grad, la, a_inv, lg, g_inv, damping)


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--damping", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stats = trained_factors(args.steps)
    lines = [f"Factor splitting accuracy: digits CNN after {args.steps} SGD steps, factors on 1,024 images, EIGEN.",
             "", "| damping | layer | A side | G side | k (A, G) | A block | rel. error vs k=1 | cos to k=1 | "
             "A only: rel. error | A only: cos | cos(grad, k=1) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for damping in args.damping:
        totals: Dict[int, List[np.ndarray]] = {}
        exact_all = []
        for name, (fa, fg, grad) in stats.items():
            exact = precondition(fa, fg, grad, 1, 1, damping)
            exact_all.append(exact.ravel())
            for k in (2, 4, 8, 16):
                ka, kg = min(k, fa.shape[0]), min(k, fg.shape[0])
                got = precondition(fa, fg, grad, ka, kg, damping)
                totals.setdefault(k, []).append(got.ravel())
                a_only = precondition(fa, fg, grad, ka, 1, damping)
                err_a = np.linalg.norm(a_only - exact) / np.linalg.norm(exact)
                err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
                lines.append(f"| {damping:g} | {name} | {fa.shape[0]} | {fg.shape[0]} | {ka}, {kg} | "
                             f"{block_layout(fa.shape[0], ka).sizes[0]} | {err:.3f} | {cosine(got, exact):.3f} | "
                             f"{err_a:.3f} | {cosine(a_only, exact):.3f} | {cosine(grad, exact):.3f} |")
        exact_cat = np.concatenate(exact_all)
        for k in (2, 4, 8, 16):
            got = np.concatenate(totals[k])
            err = np.linalg.norm(got - exact_cat) / np.linalg.norm(exact_cat)
            lines.append(f"| {damping:g} | **all layers** | | | {k} | | {err:.3f} | {cosine(got, exact_cat):.3f} | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
