"""N ranks with local batches == 1 rank with the concatenated batch, for every strategy.

Every rank also computes the single-process reference itself (``SingleProcessCommunicator``),
so the comparison needs no file exchange; parameters must be bitwise identical across ranks.
"""

from __future__ import annotations

import copy

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

STEPS = 6
LOCAL_BATCH = 4


class Net(nn.Module):
    """Conv2d, Embedding, Linear (with and without bias) and LayerNorm (unit-wise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.emb = nn.Embedding(7, 5)
        self.fc1 = nn.Linear(3 * 4 * 4 + 5, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 4, bias=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.cat([h, self.emb(ids).mean(1)], dim=1)
        return self.fc2(torch.tanh(self.norm(self.fc1(h))))


def make_data(world: int):
    gen = torch.Generator().manual_seed(1234)
    n = world * LOCAL_BATCH
    batches = []
    for _ in range(STEPS):
        x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
        ids = torch.randint(0, 7, (n, 3), generator=gen)
        y = torch.randint(0, 4, (n,), generator=gen)
        batches.append((x, ids, y))
    return batches


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().double()


CONFIG = dict(lr=0.1, damping=0.01, factor_decay=0.8, kl_clip=0.05)


def train_reference(config: dict):
    """One process, concatenated batch, same schedule."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = dict(CONFIG, **config)
    cfg["strategy"] = "comm-opt"
    cfg.pop("grad_worker_fraction", None)
    cfg.pop("canonical", None)
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), **cfg)
    for x, ids, y in make_data(hvd.size()):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, ids), y).backward()
        kfac.step()
        opt.step()
    return model


def train_distributed(config: dict):
    model = make_model()
    cfg = dict(CONFIG, **config)
    canonical = cfg.pop("canonical", False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if canonical:  # the user's own hvd.DistributedOptimizer + KFAC, Horovod's documented pattern
        opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
        kfac = ngd.KFAC(model, **cfg)
    else:
        opt = ngd.DistributedOptimizer(sgd, model, **cfg)
    lo, hi = hvd.rank() * LOCAL_BATCH, (hvd.rank() + 1) * LOCAL_BATCH
    for x, ids, y in make_data(hvd.size()):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[lo:hi], ids[lo:hi]), y[lo:hi]).backward()
        if canonical:
            opt.synchronize()
            kfac.step()
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    return model


def assert_equivalent(config: dict) -> None:
    reference = train_reference(config)
    model = train_distributed(config)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name="test.params")
    for r in range(hvd.size()):
        assert torch.equal(gathered[r], gathered[0]), f"rank {r} parameters differ from rank 0"
    init = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    assert (ref - init).abs().max() > 1e-3, "reference did not train"
    rel = (flat - ref).norm() / ref.norm()
    assert rel < 1e-8, f"relative difference to the 1-rank reference {rel:.3e}"


@pytest.mark.parametrize(
    "config",
    [
        dict(strategy="spngd"),
        dict(strategy="spngd", factor_update_interval=2, inv_update_interval=3, symmetric_packing=False),
        dict(strategy="comm-opt"),
        dict(strategy="comm-opt", canonical=True),
        dict(strategy="mem-opt", inverse_method="cholesky"),
        dict(strategy="comm-opt", stale_inverse=True, inv_update_interval=2),
        dict(strategy="spngd", interval_policy="adaptive", adaptive_threshold=0.5),
    ],
    ids=["spngd", "spngd-intervals", "comm-opt", "canonical-pattern", "mem-opt-cholesky", "stale-inverse", "spngd-adaptive"],
)
def test_matches_single_process(config: dict) -> None:
    assert_equivalent(config)


@pytest.mark.np4
@pytest.mark.parametrize("config", [dict(strategy="hybrid", grad_worker_fraction=0.5), dict(strategy="spngd")])
def test_matches_single_process_4_ranks(config: dict) -> None:
    assert hvd.size() == 4
    assert_equivalent(config)
