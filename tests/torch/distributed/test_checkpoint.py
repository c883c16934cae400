"""Checkpoint and resume mid-training: on the same world size the trajectory is bitwise the
uninterrupted one; on 1 rank (another world size) it continues as the 1-rank run on the
concatenated batch would."""

from __future__ import annotations

import copy

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

LOCAL = 4


def model_fn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(steps: int):
    gen = torch.Generator().manual_seed(42)
    n = hvd.size() * LOCAL
    return [(torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)) for _ in range(steps)]


def distributed(cfg: dict):
    model = model_fn()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, **cfg)
    return model, opt


def run(model, opt, batches, lo=None, hi=None, kfac=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()
        if kfac is not None:
            kfac.step()
        opt.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "cfg",
    [dict(strategy="spngd", damping=0.01, factor_update_interval=2, inv_update_interval=3),
     dict(strategy="comm-opt", damping=0.01, stale_inverse=True, inv_update_interval=2)],
    ids=["spngd", "comm-opt-stale"],
)
def test_resume_same_and_other_world_size(cfg: dict) -> None:
    batches = data(7)
    lo, hi = hvd.rank() * LOCAL, (hvd.rank() + 1) * LOCAL
    model, opt = distributed(cfg)
    run(model, opt, batches[:3], lo, hi)
    checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict(), opt.kfac.state_dict()))
    run(model, opt, batches[3:], lo, hi)
    uninterrupted = flat(model)

    model2, opt2 = distributed(cfg)
    model2.load_state_dict(checkpoint[0])
    opt2.load_state_dict(copy.deepcopy(checkpoint[1]))  # torch keeps the loaded tensors: copy
    opt2.kfac.load_state_dict(copy.deepcopy(checkpoint[2]))
    run(model2, opt2, batches[3:], lo, hi)
    assert torch.equal(flat(model2), uninterrupted), "same-world resume is not bitwise identical"

    # Another world size: this rank alone continues on the concatenated batch.
    model1 = model_fn()
    model1.load_state_dict(checkpoint[0])
    opt1 = torch.optim.SGD(model1.parameters(), lr=0.1, momentum=0.9)
    opt1.load_state_dict(checkpoint[1])
    kfac1 = ngd.KFAC(model1, communicator=SingleProcessCommunicator(), reduce_gradients=True, **cfg)
    kfac1.load_state_dict(checkpoint[2])
    run(model1, opt1, batches[3:], kfac=kfac1)
    rel = (flat(model1) - uninterrupted).norm() / uninterrupted.norm()
    assert rel < 1e-8, f"1-rank resume differs by {rel:.2e}"
