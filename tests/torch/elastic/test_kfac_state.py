"""``KFACState`` on a 1-rank Horovod world in this process: the ``hvd.elastic.TorchState``
API (commit, restore, sync), the preconditioner found on the drop-in optimizer, and the
refusal of a plain ``TorchState`` holding a ``KFAC``."""

from __future__ import annotations

import os

import pytest

hvd = pytest.importorskip("horovod.torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.torch.elastic import KFACState  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def horovod_one_rank():
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    hvd.init()
    yield
    hvd.shutdown()


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, damping=0.01)
    return model, opt


def steps(model, opt, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_commit_restore_sync() -> None:
    model, opt = setup()
    state = KFACState(model=model, optimizer=opt, batch=0)
    assert state.kfac is opt.kfac
    state.sync()
    steps(model, opt, 3, seed=1)
    state.batch = 3
    state.commit()
    committed = {k: v.clone() for k, v in opt.kfac.engine.factors.items()}
    steps(model, opt, 2, seed=2)
    state.batch = 5
    assert opt.kfac.steps == 5
    state.restore()
    assert state.batch == 3 and opt.kfac.steps == 3
    assert set(opt.kfac.engine.factors) == set(committed)
    assert all(torch.equal(opt.kfac.engine.factors[k], v) for k, v in committed.items())
    state.sync()
    assert opt.kfac.steps == 3
    steps(model, opt, 1, seed=3)
    assert opt.kfac.steps == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_restore_returns_to_the_commit() -> None:
    """Two failures after one commit: the second restore still gives the committed optimizer
    (momentum) and preconditioner state, not values changed by the steps in between."""
    model, opt = setup()
    state = KFACState(model=model, optimizer=opt, batch=0)
    state.sync()
    steps(model, opt, 3, seed=1)
    state.commit()
    params = [p.detach().clone() for p in model.parameters()]
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    factors = {k: v.clone() for k, v in opt.kfac.engine.factors.items()}
    for seed in (2, 3):
        steps(model, opt, 2, seed=seed)
        state.restore()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        got = opt.state_dict()["state"]
        assert set(got) == set(momentum)
        assert all(torch.equal(got[k]["momentum_buffer"], v) for k, v in momentum.items()), "momentum changed"
        assert all(torch.equal(opt.kfac.engine.factors[k], v) for k, v in factors.items())


def test_misuse() -> None:
    model, opt = setup()
    with pytest.raises(TypeError, match="KFACState"):
        hvd.elastic.TorchState(model=model, kfac=opt.kfac)
    with pytest.raises(ValueError, match="kfac"):
        KFACState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
