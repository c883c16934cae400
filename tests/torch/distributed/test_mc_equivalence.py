"""``fisher_type='mc'`` on N ranks with local batches == 1 process with the concatenated batch.

Labels are drawn by inverse-CDF from uniforms fixed per *global* sample and step, so every rank
draws for its slice exactly what the single process draws for the same samples; everything else
(the sampled backward pass, the summed-loss scaling, the reduction of G over ranks, the
true-label gradient) is the adapter's own. Parameters must be identical on every rank.
"""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

STEPS = 6
LOCAL_BATCH = 4


class Net(nn.Module):
    """Grouped Conv2d, Conv1d, Embedding, Linear and LayerNorm (unit-wise F from the MC pass too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(1, 2, 3)
        self.emb = nn.Embedding(7, 5)
        self.fc1 = nn.Linear(4 * 4 * 4 + 2 * 14 + 5, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 4, bias=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        s = torch.relu(self.conv1d(x[:, :1].reshape(len(x), 1, 16))).flatten(1)
        h = torch.cat([h, s, self.emb(ids).mean(1)], dim=1)
        return self.fc2(torch.tanh(self.norm(self.fc1(h))))


def make_data(world: int):
    gen = torch.Generator().manual_seed(1234)
    n = world * LOCAL_BATCH
    return [
        (torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 7, (n, 3), generator=gen),
         torch.randint(0, 4, (n,), generator=gen))
        for _ in range(STEPS)
    ]


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().double()

CONFIG = dict(lr=0.1, damping=0.01, factor_decay=0.8, kl_clip=0.05, fisher_type="mc", loss_family="cross_entropy",
              factor_update_interval=1, inv_update_interval=1)


class GlobalIndexSampler:
    """Categorical draws from uniforms u[step, global sample]: rank-slice invariant."""

    def __init__(self, lo: int, hi: int) -> None:
        gen = torch.Generator().manual_seed(99)
        self.u = torch.rand(STEPS, hvd.size() * LOCAL_BATCH, generator=gen, dtype=torch.float64)
        self.lo, self.hi = lo, hi
        self.calls = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(logits.double(), -1).cumsum(-1)
        u = self.u[self.calls, self.lo : self.hi, None]
        self.calls += 1
        return (u > cdf).sum(-1).clamp(max=logits.shape[-1] - 1)


def train(model, opt, kfac, lo: int, hi: int):
    for x, ids, y in make_data(hvd.size()):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[lo:hi], ids[lo:hi]), y[lo:hi]).backward()
        opt.step()
    return model


@pytest.mark.parametrize(
    "config",
    [dict(strategy="spngd"), dict(strategy="comm-opt"), dict(strategy="spngd", factor_update_interval=2, inv_update_interval=2)],
    ids=["spngd", "comm-opt", "spngd-intervals"],
)
def test_mc_matches_single_process(config: dict) -> None:
    cfg = dict(CONFIG, **config)
    n = hvd.size() * LOCAL_BATCH
    reference = make_model()
    ref_cfg = dict(cfg, strategy="comm-opt")
    sampler = GlobalIndexSampler(0, n)
    kfac = ngd.KFAC(reference, communicator=SingleProcessCommunicator(), mc_sampler=sampler, **ref_cfg)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, ids, y in make_data(hvd.size()):
        sgd.zero_grad()
        nn.functional.cross_entropy(reference(x, ids), y).backward()
        kfac.step()
        sgd.step()
    expected_calls = sampler.calls

    model = make_model()
    lo, hi = hvd.rank() * LOCAL_BATCH, (hvd.rank() + 1) * LOCAL_BATCH
    local_sampler = GlobalIndexSampler(lo, hi)
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   mc_sampler=local_sampler, **cfg)
    train(model, opt, None, lo, hi)
    assert local_sampler.calls == expected_calls == (STEPS if "factor_update_interval" not in config else STEPS // 2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name="test.mc.params")
    for r in range(hvd.size()):
        assert torch.equal(gathered[r], gathered[0]), f"rank {r} parameters differ from rank 0"
    init = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    assert (ref - init).abs().max() > 1e-3, "reference did not train"
    rel = (flat - ref).norm() / ref.norm()
    assert rel < 1e-8, f"relative difference to the 1-rank reference {rel:.3e}"
