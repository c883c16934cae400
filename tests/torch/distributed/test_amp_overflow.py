"""GradScaler with the spngd drop-in optimizer on 2 ranks: an overflow on one rank only drops the
step on every rank (one agreed flag), parameters stay identical across ranks, and training goes
on afterwards."""

from __future__ import annotations

import horovod.torch as hvd
import torch
from torch import nn

import hvd_ngd.torch as ngd


def test_overflow_on_one_rank_skips_the_step_everywhere() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   grad_scaler=scaler, damping=0.03)
    gen = torch.Generator().manual_seed(hvd.rank())
    skipped = []
    for step in range(4):
        x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step == 1 and hvd.rank() == 1:
            loss = loss * float("inf")
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        opt.step()
        scaler.update()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        skipped.append(opt.kfac.last_step_skipped)
        if step == 1:
            assert torch.equal(before, after), "a rank updated during an overflowed step"
        gathered = hvd.allgather(after.unsqueeze(0), name=f"test.amp.params.{step}")
        assert torch.equal(gathered[0], gathered[1]), f"ranks differ after step {step}"
    assert skipped == [False, True, False, False]
    assert opt.kfac.steps == 3 and opt.kfac.engine.fallbacks == []
