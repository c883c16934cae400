"""Conv1d, grouped / depthwise Conv2d (one Kronecker block per group), GroupNorm / InstanceNorm
(unit-wise), MultiheadAttention (skipped with its reason), and every torch.nn standard block
training with ``KFAC(model)`` out of the box.

References are independent of the adapter: numpy im2col, per-sample gradients from autograd,
and dense (Kronecker or 2x2) solves in float64.
"""

from __future__ import annotations

import warnings

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
    return np.linalg.solve(f, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def step_capturing(model: nn.Module, kfac: ngd.KFAC, x: torch.Tensor, module: nn.Module):
    """One mean-loss step; returns (layer input, output grad of the summed loss, grads before, after)."""
    seen = {}

    def hook(mod, inp, out):
        seen["x"] = inp[0].detach().clone()
        out.retain_grad()
        seen["y"] = out

    h = module.register_forward_hook(hook)
    out = model(x)
    (out**2).reshape(out.shape[0], -1).sum(1).mean().backward()
    h.remove()
    before = {n: p.grad.detach().clone().numpy() for n, p in module.named_parameters()}
    kfac.step()
    after = {n: p.grad.detach().clone().numpy() for n, p in module.named_parameters()}
    return seen["x"].numpy(), seen["y"].grad.numpy() * x.shape[0], before, after


def im2col_1d(x: np.ndarray, k: int, left: int, right: int, stride: int, mode: str) -> np.ndarray:
    """(N, L, C*k) patches in the weight's (c, j) order after explicit padding."""
    xp = np.pad(x, ((0, 0), (0, 0), (left, right)), mode=mode)
    n, c, length = xp.shape
    out_len = (length - k) // stride + 1
    return np.stack([xp[:, :, i * stride : i * stride + k].reshape(n, -1) for i in range(out_len)], 1)


def im2col_2d(x: np.ndarray, k: int, pad: int) -> np.ndarray:
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    return np.stack([xp[:, :, i : i + k, j : j + k].reshape(n, -1) for i in range(oh) for j in range(ow)], 1)


def kron_factors(patches: np.ndarray, g: np.ndarray, bias: bool):
    """A averages over samples and locations, G sums over locations, averages over samples."""
    n, l, _ = patches.shape
    aug = np.concatenate([patches, np.ones((n, l, 1))], 2) if bias else patches
    a = np.einsum("nli,nlj->ij", aug, aug) / (n * l)
    gl = g.reshape(n, g.shape[1], -1).transpose(0, 2, 1)
    return a, np.einsum("nli,nlj->ij", gl, gl) / n


@pytest.mark.parametrize(
    "padding,mode,stride",
    [(1, "zeros", 1), ("same", "zeros", 1), (2, "reflect", 2), ("valid", "circular", 1)],
)
def test_conv1d_factors_and_solve(padding, mode, stride) -> None:
    torch.manual_seed(0)
    layer = nn.Conv1d(2, 3, 4 if padding == "same" else 3, padding=padding, padding_mode=mode, stride=stride).double()
    kfac = kfac_for(layer)
    x, g, before, after = step_capturing(layer, kfac, torch.randn(N, 2, 9, dtype=torch.float64), layer)
    k = layer.kernel_size[0]
    if padding == "same":
        left, right = (k - 1) // 2, k - 1 - (k - 1) // 2
    elif padding == "valid":
        left = right = 0
    else:
        left = right = padding
    np_mode = {"zeros": "constant", "reflect": "reflect", "circular": "wrap"}[mode]
    patches = im2col_1d(x, k, left, right, stride, np_mode)
    a_ref, g_ref = kron_factors(patches, g, bias=True)
    np.testing.assert_allclose(kfac.engine.factors["root/A"].numpy(), a_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(kfac.engine.factors["root/G"].numpy(), g_ref, rtol=1e-10, atol=1e-13)
    grad = np.concatenate([before["weight"].reshape(3, -1), before["bias"][:, None]], 1)
    expected = dense_solve(a_ref, g_ref, grad)
    np.testing.assert_allclose(after["weight"].reshape(3, -1), expected[:, :-1], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(after["bias"], expected[:, -1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("in_ch,out_ch,groups", [(4, 6, 2), (3, 6, 3), (4, 4, 4)], ids=["grouped", "depthwise-x2", "depthwise"])
def test_grouped_conv2d_one_block_per_group(in_ch: int, out_ch: int, groups: int) -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(in_ch, out_ch, 3, padding=1, groups=groups).double()
    kfac = kfac_for(layer)
    assert [lay.name for lay in kfac.layers] == [f"root#g{i}" for i in range(groups)]
    x, g, before, after = step_capturing(layer, kfac, torch.randn(N, in_ch, 4, 4, dtype=torch.float64), layer)
    ci, co = in_ch // groups, out_ch // groups
    for i in range(groups):
        patches = im2col_2d(x[:, i * ci : (i + 1) * ci], 3, 1)
        a_ref, g_ref = kron_factors(patches, g[:, i * co : (i + 1) * co], bias=True)
        np.testing.assert_allclose(kfac.engine.factors[f"root#g{i}/A"].numpy(), a_ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(kfac.engine.factors[f"root#g{i}/G"].numpy(), g_ref, rtol=1e-10, atol=1e-13)
        rows = slice(i * co, (i + 1) * co)
        grad = np.concatenate([before["weight"][rows].reshape(co, -1), before["bias"][rows, None]], 1)
        expected = dense_solve(a_ref, g_ref, grad)
        np.testing.assert_allclose(after["weight"][rows].reshape(co, -1), expected[:, :-1], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(after["bias"][rows], expected[:, -1], rtol=1e-8, atol=1e-12)


def test_grouped_conv2d_blocks_equal_per_group_dense_fisher() -> None:
    """With one sample and one output location each group's Kronecker block is exact: it must
    equal the dense Fisher block E[vec(dW_g) vec(dW_g)^T] of that group's weights, built from
    autograd's gradient (no im2col, no adapter code), and the preconditioned gradient must be
    the dense per-group solve."""
    torch.manual_seed(2)
    layer = nn.Conv2d(4, 6, 3, groups=2).double()  # 3x3 input, 3x3 kernel: one output location
    kfac = kfac_for(layer)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    out = layer(x)
    (out**2).sum().backward()  # a sum over one sample: the gradient is the per-sample gradient
    dw = layer.weight.grad.detach().clone()
    db = layer.bias.grad.detach().clone()
    kfac.step()
    for i in range(2):
        rows = slice(3 * i, 3 * i + 3)
        grad_g = torch.cat([dw[rows].reshape(3, -1), db[rows, None]], 1).numpy()
        v = grad_g.reshape(-1, order="F")
        dense = np.outer(v, v)
        a, g = (kfac.engine.factors[f"root#g{i}/{s}"].numpy() for s in "AG")
        np.testing.assert_allclose(np.kron(a, g), dense, rtol=1e-10, atol=1e-12)
        pv = np.linalg.solve(dense + DAMPING * np.eye(len(v)), v).reshape(grad_g.shape, order="F")
        np.testing.assert_allclose(layer.weight.grad[rows].reshape(3, -1).numpy(), pv[:, :-1], rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(layer.bias.grad[rows].numpy(), pv[:, -1], rtol=1e-7, atol=1e-10)


def unitwise_solve(x_hat: np.ndarray, g: np.ndarray, grad_w: np.ndarray, grad_b: np.ndarray):
    """Per channel: F = mean_n [dgamma dbeta]^T [dgamma dbeta] from per-sample sums; solve 2x2."""
    n, c, _ = x_hat.shape
    pw, pb = np.zeros(c), np.zeros(c)
    for ch in range(c):
        per = np.array([[np.sum(g[i, ch] * x_hat[i, ch]), np.sum(g[i, ch])] for i in range(n)])
        f = per.T @ per / n
        pw[ch], pb[ch] = np.linalg.solve(f + DAMPING * np.eye(2), [grad_w[ch], grad_b[ch]])
    return pw, pb


@pytest.mark.parametrize("kind", ["group", "instance", "batch3d"])
def test_channel_norms_are_unitwise(kind: str) -> None:
    torch.manual_seed(3)
    layer = {
        "group": nn.GroupNorm(2, 4),
        "instance": nn.InstanceNorm2d(4, affine=True),
        "batch3d": nn.BatchNorm3d(4),
    }[kind].double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    kfac = kfac_for(layer)
    shape = (N, 4, 2, 2, 2) if kind == "batch3d" else (N, 4, 3, 2)
    x, g, before, after = step_capturing(layer, kfac, torch.randn(*shape, dtype=torch.float64), layer)
    if kind == "group":
        xg = x.reshape(N, 2, -1)
        x_hat = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + layer.eps)).reshape(N, 4, -1)
    elif kind == "instance":
        xi = x.reshape(N, 4, -1)
        x_hat = (xi - xi.mean(-1, keepdims=True)) / np.sqrt(xi.var(-1, keepdims=True) + layer.eps)
    else:
        axes = (0, 2, 3, 4)
        x_hat = ((x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + layer.eps)).reshape(N, 4, -1)
    pw, pb = unitwise_solve(x_hat, g.reshape(N, 4, -1), before["weight"], before["bias"])
    np.testing.assert_allclose(after["weight"], pw, rtol=1e-7)
    np.testing.assert_allclose(after["bias"], pb, rtol=1e-7)


def test_multihead_attention_is_skipped_with_its_reason() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    with pytest.warns(UserWarning, match="functionally") as record:
        kfac = kfac_for(model)
    assert sum("MultiheadAttention" in str(w.message) for w in record) == 1  # one warning per MHA
    assert [lay.name for lay in kfac.layers] == ["0"]
    assert "functionally" in kfac.skipped["attn"] and "attn.out_proj" in kfac.skipped


# ---------------------------------------------------------------- every standard block trains


class Tokens(nn.Module):
    """Embedding -> a Transformer block -> Linear head, logits (N, T, V)."""

    def __init__(self, block: nn.Module, batch_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.block = block
        self.batch_first = batch_first
        self.head = nn.Linear(16, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if not self.batch_first:
            h = h.transpose(0, 1)
        if isinstance(self.block, (nn.TransformerDecoderLayer, nn.TransformerDecoder)):
            h = self.block(h, h)
        elif isinstance(self.block, nn.Transformer):
            h = self.block(h, h)
        elif isinstance(self.block, nn.MultiheadAttention):
            h = self.block(h, h, h, need_weights=False)[0]
        else:
            h = self.block(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


class Image(nn.Module):
    """Any image/sequence block followed by a pooled Linear head."""

    def __init__(self, block: nn.Module, channels: int) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(channels, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return self.head(h.flatten(2).amax(2) if h.dim() > 2 else h)  # a mean would cancel after InstanceNorm


def enc(**kw) -> nn.Module:
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=kw.pop("batch_first", True), **kw)


STANDARD = {
    "linear": lambda: Image(nn.Sequential(nn.Linear(8, 12), nn.ReLU()), 12),
    "conv1d": lambda: Image(nn.Sequential(nn.Conv1d(8, 12, 3, padding="same"), nn.BatchNorm1d(12), nn.ReLU()), 12),
    "conv2d": lambda: Image(nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()), 12),
    "conv2d-groups": lambda: Image(nn.Sequential(nn.Conv2d(8, 12, 3, groups=4, padding=1), nn.GroupNorm(3, 12)), 12),
    "conv2d-depthwise": lambda: Image(
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="reflect"), nn.Conv2d(8, 12, 1)), 12
    ),
    "convnext-block": lambda: Image(
        nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.InstanceNorm2d(8, affine=True), nn.Conv2d(8, 12, 1)), 12
    ),
    "norms": lambda: Image(nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.RMSNorm(12), nn.LayerNorm(12, bias=False)), 12),
    "embedding": lambda: Tokens(nn.Identity()),
    "multihead-attention": lambda: Tokens(nn.MultiheadAttention(16, 4, batch_first=True)),
    "mha-seq-first-kdim": lambda: Tokens(nn.MultiheadAttention(16, 4, kdim=16, vdim=16, bias=False), batch_first=False),
    "transformer-encoder-layer": lambda: Tokens(enc()),
    "transformer-encoder-norm-first-gelu": lambda: Tokens(enc(norm_first=True, activation="gelu")),
    "transformer-encoder-seq-first": lambda: Tokens(enc(batch_first=False), batch_first=False),
    "transformer-encoder": lambda: Tokens(nn.TransformerEncoder(enc(), 2, enable_nested_tensor=False)),
    "transformer-decoder-layer": lambda: Tokens(nn.TransformerDecoderLayer(16, 4, 32, batch_first=True)),
    "transformer-decoder": lambda: Tokens(nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, batch_first=True), 2)),
    "transformer": lambda: Tokens(nn.Transformer(16, 4, 1, 1, 32, batch_first=True)),
}


def standard_input(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if name in ("linear", "norms"):
        return torch.randn(6, 8, generator=gen)
    if name == "conv1d":
        return torch.randn(6, 8, 9, generator=gen)
    if name.startswith("conv"):
        return torch.randn(6, 8, 5, 5, generator=gen)
    return torch.randint(0, 11, (6, 7), generator=gen)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("name", sorted(STANDARD))
def test_standard_blocks_train_out_of_the_box(name: str, fisher: str) -> None:
    torch.manual_seed(0)
    model = STANDARD[name]()
    x = standard_input(name)
    y = torch.randint(0, 11, x.shape[:1] if x.is_floating_point() else x.shape)
    extra = dict(fisher_type="mc", loss_family="cross_entropy") if fisher == "mc" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skipped layers warn; tested above
        kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), damping=0.01, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        loss.backward()
        kfac.step()
        opt.step()
        losses.append(loss.item())
    assert kfac.steps == 3 and all(np.isfinite(losses))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for layer in kfac.layers:  # every registered layer was preconditioned from its own statistics
        assert kfac.engine.has_curvature(layer.name), layer.name
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), start)]
    assert all(moved), "a parameter did not move"
    assert kfac.engine.fallbacks == []
