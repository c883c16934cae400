"""Through the real hooks: captured factors and preconditioned gradients of every supported
module equal an independent numpy reference (dense Kronecker solve, explicit per-sample loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

DAMPING = 0.05
N = 5


def kfac_for(model: nn.Module, **extra) -> ngd.KFAC:
    cfg = dict(damping=DAMPING, factor_decay=0.0, kl_clip=None, strategy="comm-opt")
    cfg.update(extra)
    return ngd.KFAC(model, communicator=SingleProcessCommunicator(), **cfg)


def dense_solve(a: np.ndarray, g: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(A (x) G + damping I)^-1 vec(grad), vec column-major, back to a matrix."""
    f = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
    v = np.linalg.solve(f, grad.reshape(-1, order="F"))
    return v.reshape(grad.shape, order="F")


def run_one_step(model: nn.Module, kfac: ngd.KFAC, inputs, target_module: nn.Module):
    """Forward/backward with a mean loss; returns (input, output grad * N, grads before step)."""
    captured = {}

    def fwd_hook(mod, inp, out):
        captured["x"] = inp[0].detach().clone()
        out.retain_grad()
        captured["y"] = out

    h = target_module.register_forward_hook(fwd_hook)
    out = model(inputs)
    loss = (out**2).sum(dim=-1).mean() if out.dim() == 2 else (out**2).mean()
    loss.backward()
    h.remove()
    before = {n: p.grad.detach().clone().numpy() for n, p in target_module.named_parameters()}
    kfac.step()
    after = {n: p.grad.detach().clone().numpy() for n, p in target_module.named_parameters()}
    return captured["x"].numpy(), captured["y"].grad.numpy() * N, before, after


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=bias).double()
    kfac = kfac_for(layer)
    x, g, before, after = run_one_step(layer, kfac, torch.randn(N, 4, dtype=torch.float64), layer)
    a = np.concatenate([x, np.ones((N, 1))], 1) if bias else x
    a_ref = sum(np.outer(a[i], a[i]) for i in range(N)) / N
    g_ref = sum(np.outer(g[i], g[i]) for i in range(N)) / N
    np.testing.assert_allclose(kfac.engine.factors[f"{kfac.layers[0].name}/A"].numpy(), a_ref, rtol=1e-12)
    np.testing.assert_allclose(kfac.engine.factors[f"{kfac.layers[0].name}/G"].numpy(), g_ref, rtol=1e-12)
    grad = np.concatenate([before["weight"], before["bias"][:, None]], 1) if bias else before["weight"]
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(after["weight"], expected[:, :4], rtol=1e-8, atol=1e-12)
    if bias:
        np.testing.assert_allclose(after["bias"], expected[:, 4], rtol=1e-8, atol=1e-12)


def im2col(x: np.ndarray, k: int, pad: int, stride: int) -> np.ndarray:
    """Independent im2col: (N, L, C*k*k) in the torch weight's (c, i, j) order."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((n, oh * ow, c * k * k))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, i * ow + j, :] = patch.reshape(n, -1)
    return out


@pytest.mark.parametrize("inverse_method", ["eigen", "cholesky"])
def test_conv2d(inverse_method: str) -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    kfac = kfac_for(layer, inverse_method=inverse_method, pi_correction=False)
    x, g, before, after = run_one_step(layer, kfac, torch.randn(N, 2, 5, 5, dtype=torch.float64), layer)
    patches = im2col(x, 3, 1, 2)
    n, l, d = patches.shape
    aug = np.concatenate([patches, np.ones((n, l, 1))], 2)
    a_ref = np.einsum("nli,nlj->ij", aug, aug) / (n * l)
    gl = g.reshape(n, 3, -1).transpose(0, 2, 1)
    g_ref = np.einsum("nli,nlj->ij", gl, gl) / n
    name = kfac.layers[0].name
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/A"].numpy(), a_ref, rtol=1e-12)
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/G"].numpy(), g_ref, rtol=1e-12)
    grad = np.concatenate([before["weight"].reshape(3, -1), before["bias"][:, None]], 1)
    if inverse_method == "eigen":
        expected = dense_solve(a_ref, g_ref, grad)
    else:  # split damping sqrt(l) on each factor (pi_correction=False)
        s = np.sqrt(DAMPING)
        expected = np.linalg.inv(g_ref + s * np.eye(3)) @ grad @ np.linalg.inv(a_ref + s * np.eye(d + 1))
    np.testing.assert_allclose(after["weight"].reshape(3, -1), expected[:, :d], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(after["bias"], expected[:, d], rtol=1e-8, atol=1e-12)


def test_embedding() -> None:
    torch.manual_seed(2)
    layer = nn.Embedding(6, 3).double()
    kfac = kfac_for(layer)
    ids = torch.tensor([[0, 1, 1], [2, 5, 5], [5, 0, 3], [1, 1, 1], [4, 0, 2]])
    x, g, before, after = run_one_step(layer, kfac, ids, layer)
    rows = x.reshape(-1)
    a_ref = np.diag(np.bincount(rows, minlength=6) / rows.size)
    gr = g.reshape(-1, 3)
    g_ref = gr.T @ gr / gr.shape[0]
    name = kfac.layers[0].name
    np.testing.assert_allclose(np.diag(a_ref), kfac.engine.factors[f"{name}/A"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(kfac.engine.factors[f"{name}/G"].numpy(), g_ref, rtol=1e-12)
    expected = dense_solve(a_ref, g_ref, before["weight"].T)
    np.testing.assert_allclose(after["weight"], expected.T, rtol=1e-8, atol=1e-12)


def unitwise_reference(x_hat: np.ndarray, g: np.ndarray, grad_w: np.ndarray, grad_b: np.ndarray):
    """Per channel: F = mean_n [dγ dβ]^T [dγ dβ] from explicit per-sample sums; solve 2x2."""
    n, c, _ = x_hat.shape
    pw, pb = np.zeros(c), np.zeros(c)
    for ch in range(c):
        per = np.array([[np.sum(g[i, ch] * x_hat[i, ch]), np.sum(g[i, ch])] for i in range(n)])
        f = per.T @ per / n
        pw[ch], pb[ch] = np.linalg.solve(f + DAMPING * np.eye(2), [grad_w[ch], grad_b[ch]])
    return pw, pb


def test_batchnorm2d() -> None:
    torch.manual_seed(3)
    layer = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    kfac = kfac_for(layer)
    x, g, before, after = run_one_step(layer, kfac, torch.randn(N, 3, 2, 2, dtype=torch.float64), layer)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    x_hat = ((x - mean) / np.sqrt(var + layer.eps)).reshape(N, 3, -1)
    pw, pb = unitwise_reference(x_hat, g.reshape(N, 3, -1), before["weight"], before["bias"])
    np.testing.assert_allclose(after["weight"], pw, rtol=1e-7)
    np.testing.assert_allclose(after["bias"], pb, rtol=1e-7)


def test_layernorm_sequence() -> None:
    torch.manual_seed(4)
    layer = nn.LayerNorm(4).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    kfac = kfac_for(layer)
    x, g, before, after = run_one_step(layer, kfac, torch.randn(N, 3, 4, dtype=torch.float64), layer)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    x_hat = ((x - mean) / np.sqrt(var + layer.eps)).transpose(0, 2, 1)  # (N, C=4, L=3)
    pw, pb = unitwise_reference(x_hat, g.transpose(0, 2, 1), before["weight"], before["bias"])
    np.testing.assert_allclose(after["weight"], pw, rtol=1e-7)
    np.testing.assert_allclose(after["bias"], pb, rtol=1e-7)
