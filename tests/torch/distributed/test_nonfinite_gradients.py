"""A NaN in one rank's input batch at one step: every rank skips that update (no parameter,
momentum or factor changes), warns, and goes on training identical finite weights."""

from __future__ import annotations

import warnings

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.engine.preconditioner import NonFiniteGradientWarning

STEPS = 5
POISONED = 2


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_nan_batch_on_one_rank_skips_the_step_everywhere(strategy: str) -> None:
    hvd.init()
    model = net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ngd.DistributedOptimizer(sgd, model, strategy=strategy, lr=0.1, damping=0.01)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(100 + hvd.rank())
    snapshots = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            if step == POISONED and hvd.rank() == 1:
                x[0, 0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            factors = {k: v.clone() for k, v in opt.kfac.engine.factors.items()}
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            snapshots.append((before, [p.detach().clone() for p in model.parameters()], factors,
                              {k: v.clone() for k, v in opt.kfac.engine.factors.items()}))
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteGradientWarning)]
    assert len(messages) == 1 and f"at step {POISONED}" in messages[0], messages
    # SP-NGD gets local gradients, so the rank is named; Horovod already averaged KAISA's
    who = "rank(s) 1" if strategy == "spngd" else "non-finite gradients (averaged over ranks by Horovod"
    assert who in messages[0], messages
    assert opt.kfac.skipped_steps == 1 and opt.kfac.steps == STEPS - 1
    before, after, f_before, f_after = snapshots[POISONED]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the skipped step changed parameters"
    assert all(torch.equal(f_before[k], f_after[k]) for k in f_before), "the skipped step folded factors"
    final = [p.detach() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in final)
    for i, p in enumerate(final):  # identical on every rank
        gathered = hvd.allgather(p.reshape(1, -1), name=f"nonfinite.check.{strategy}.{i}")
        assert torch.equal(gathered[0], gathered[1])
    assert not torch.equal(snapshots[-1][1][0], snapshots[POISONED][1][0]), "training went on after the skip"
