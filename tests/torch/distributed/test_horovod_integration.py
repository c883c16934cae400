"""hvd_ngd's optimizers inside the usual Horovod recipe: broadcast_parameters,
broadcast_optimizer_state (which calls step() with zero gradients and no backward pass),
and rank-consistency errors raised on every rank instead of hangs."""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.consistency import RankMismatchError


def model_for(width: int = 3) -> nn.Module:
    torch.manual_seed(hvd.rank())  # different on purpose: broadcast_parameters must fix it
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, width))


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_broadcast_optimizer_state_then_train(strategy: str) -> None:
    model = model_for()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                                   strategy=strategy, damping=0.01)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.kfac.steps == 0, "initialising optimizer state must not run a preconditioning step"
    gen = torch.Generator().manual_seed(10 + hvd.rank())
    for _ in range(3):
        opt.zero_grad()
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.kfac.steps == 3
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name=f"integration.params.{strategy}")
    assert torch.equal(gathered[0], gathered[1])


def test_different_models_raise_on_every_rank() -> None:
    model = model_for(width=3 if hvd.rank() == 0 else 4)
    with pytest.raises(RankMismatchError, match="layers differ between rank 0 and rank 1"):
        ngd.KFAC(model, damping=0.01)


def test_different_config_raises_on_every_rank() -> None:
    with pytest.raises(RankMismatchError, match="damping"):
        ngd.KFAC(model_for(), damping=0.01 * (1 + hvd.rank()))


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_learning_rate_schedule_on_one_rank_raises_on_every_rank_at_the_next_step(strategy: str) -> None:
    model = model_for()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model,
                                   strategy=strategy, damping=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(3 + hvd.rank())
    before = None
    for step in range(4):
        opt.zero_grad()
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RankMismatchError, match=r"at step 2: .*group0\.lr: rank 0 has 0\.025, rank 1 has 0\.0125"):
                opt.step()
            break
        opt.step()
        if hvd.rank() == 1 or step == 0:  # rank 1 steps its scheduler once more than rank 0
            scheduler.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "a mismatched step changed weights"


def test_momentum_differing_across_ranks_is_named() -> None:
    model = model_for()
    momentum = 0.9 if hvd.rank() == 0 else 0.5
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), model,
                                   strategy="spngd", damping=0.01)
    nn.functional.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    with pytest.raises(RankMismatchError, match=r"group0\.momentum: rank 0 has 0\.9, rank 1 has 0\.5"):
        opt.step()
