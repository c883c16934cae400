"""Mixed precision on CPU: bf16 autocast (and a bf16 model) against the same steps in fp32;
factors and decompositions in fp32, gradients back in the parameter's dtype; GradScaler's
overflow steps dropped, its unscale order enforced.

Tolerances: bf16 has an 8-bit mantissa, and the plain gradients of one bf16-autocast step
already differ from fp32 by up to 10% (relative Frobenius, the first conv's weight). K-FAC must
not add much to that: each layer's preconditioned gradient (weight and bias) has a relative
error at most ``3 * (its plain gradient's error) + 0.03``, the whole
preconditioned gradient's below ``TOL_GRAD``, the parameters after ``STEPS`` steps below
``TOL_PARAMS`` and their change from the start below ``TOL_STEP``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.torch import amp

TOL_GRAD = 0.1  # measured: 0.03-0.055
TOL_PARAMS = 1e-2  # measured: 1.8e-3
TOL_STEP = 0.1  # measured: 0.033-0.035
STEPS = 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.emb = nn.Embedding(9, 4)
        self.fc1 = nn.Linear(6 * 16 + 4, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.bn(self.conv(x)))).flatten(1)
        h = torch.cat([h, self.emb(ids).mean(1).to(h.dtype)], 1)
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


def data(steps: int):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 2, 4, 4, generator=gen), torch.randint(0, 9, (16, 3), generator=gen),
             torch.randint(0, 5, (16,), generator=gen)) for _ in range(steps)]


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(net: nn.Module, autocast: bool, steps: int, **cfg):
    """Train ``steps`` steps; returns (kfac, (plain, preconditioned) grads of the first step)."""
    kfac = ngd.KFAC(net, communicator=SingleProcessCommunicator(), strategy="comm-opt", damping=0.03, **cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    first = None
    for x, ids, y in data(steps):
        opt.zero_grad()
        dtype = next(net.parameters()).dtype
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x.to(dtype), ids)
            loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        plain = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        kfac.step()
        if first is None:
            first = plain, {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        opt.step()
    return kfac, first


def assert_close_to_fp32(low, ref, dtype: torch.dtype) -> None:
    """Per layer (weight and bias together: K-FAC mixes them) and over the whole model."""
    (plain_low, pre_low), (plain_ref, pre_ref) = low, ref
    assert all(g.dtype == dtype for g in pre_low.values())

    def cat(d, prefix=""):
        return torch.cat([v.reshape(-1).double() for k, v in d.items() if k.startswith(prefix)])

    for layer in sorted({name.rsplit(".", 1)[0] + "." for name in pre_low}):
        bound = 3 * rel(cat(plain_low, layer), cat(plain_ref, layer)) + 0.03
        err = rel(cat(pre_low, layer), cat(pre_ref, layer))
        assert err < bound, (layer, err, bound)
    assert rel(cat(pre_low), cat(pre_ref)) < TOL_GRAD


@pytest.mark.parametrize("fisher", [{}, dict(fisher_type="mc", loss_family="cross_entropy")], ids=["empirical", "mc"])
def test_bf16_autocast_matches_fp32(fisher) -> None:
    torch.manual_seed(5)
    ref_net, bf_net = model(), model()
    start = torch.cat([p.detach().reshape(-1) for p in ref_net.parameters()])
    if fisher:
        gens = [torch.Generator().manual_seed(1) for _ in range(2)]
        samplers = [ngd.fisher.default_sampler(ngd.fisher.LossFamily.CROSS_ENTROPY, g) for g in gens]
    ref, ref_grads = run(ref_net, False, STEPS, **fisher, **({"mc_sampler": samplers[0]} if fisher else {}))
    bf, bf_grads = run(bf_net, True, STEPS, **fisher, **({"mc_sampler": samplers[1]} if fisher else {}))
    assert bf.engine.fallbacks == [] and ref.engine.fallbacks == []
    for key, value in bf.engine.factors.items():
        assert value.dtype == torch.float32, key
    for key, inv in bf.engine.inverses.items():
        for t in (inv.eigvals, inv.eigvecs, inv.inverse):
            assert t is None or t.dtype == torch.float32, key
    assert_close_to_fp32(bf_grads, ref_grads, torch.float32)
    p_bf = torch.cat([p.detach().reshape(-1) for p in bf_net.parameters()])
    p_ref = torch.cat([p.detach().reshape(-1) for p in ref_net.parameters()])
    assert rel(p_bf, p_ref) < TOL_PARAMS
    assert rel(p_bf - start, p_ref - start) < TOL_STEP


def test_bf16_model_keeps_fp32_statistics_and_bf16_gradients() -> None:
    ref_net, bf_net = model(), model().to(torch.bfloat16)
    ref, ref_grads = run(ref_net, False, 1)
    bf, bf_grads = run(bf_net, False, 1)
    assert bf.engine.fallbacks == []
    assert all(v.dtype == torch.float32 for v in bf.engine.factors.values())
    assert_close_to_fp32(bf_grads, ref_grads, torch.bfloat16)


def test_grad_scaler_overflow_step_is_dropped_and_order_is_enforced() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    kfac = ngd.KFAC(net, communicator=SingleProcessCommunicator(), grad_scaler=scaler, strategy="comm-opt",
                    damping=0.03, reduce_gradients=True)
    (x, ids, y), = data(1)
    for poison in (False, True, False):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x, ids), y) * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        with pytest.raises(RuntimeError, match="unscale_"):
            amp.check_unscaled(scaler, opt)
        scaler.unscale_(opt)
        amp.check_unscaled(scaler, opt)
        before = copy.deepcopy(net.state_dict())
        steps = kfac.steps
        kfac.step()
        assert kfac.last_step_skipped is poison
        assert kfac.steps == steps + (0 if poison else 1)
        scaler.step(opt)
        scaler.update()
        if poison:
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert kfac.engine.fallbacks == []  # the overflowed statistics never reached the factors
    assert all(torch.isfinite(v).all() for v in kfac.engine.factors.values())
