"""KFAC object behaviour in one process: state round trip, bad config, misuse, rank mismatch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator
from hvd_ngd.consistency import RankMismatchError, check_consistent
from hvd_ngd.config import KFACConfig
from hvd_ngd.testing import ThreadedWorld
from hvd_ngd.torch.layers import make_layer


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n: int):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)) for _ in range(n)]


def make(model: nn.Module, **cfg):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt", damping=0.01,
                    factor_update_interval=2, inv_update_interval=3, **cfg)
    return opt, kfac


def train(model, opt, kfac, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        kfac.step()
        opt.step()


@pytest.mark.parametrize("cfg", [{}, {"interval_policy": "adaptive"}])
def test_state_dict_round_trip_gives_identical_next_steps(cfg) -> None:
    data = batches(8)
    model = net()
    opt, kfac = make(model, **cfg)
    train(model, opt, kfac, data[:4])
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(kfac.state_dict()))
    train(model, opt, kfac, data[4:])
    model2 = net()
    opt2, kfac2 = make(model2, **cfg)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    kfac2.load_state_dict(saved[2])
    train(model2, opt2, kfac2, data[4:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert kfac2.steps == kfac.steps == 8


def test_bad_config_raises_naming_the_parameter() -> None:
    with pytest.raises(ValueError, match="damping"):
        ngd.KFAC(net(), communicator=SingleProcessCommunicator(), damping=-1.0)
    with pytest.raises(ValueError, match="strategy"):
        ngd.KFAC(net(), communicator=SingleProcessCommunicator(), strategy="bogus")
    with pytest.raises(TypeError):
        ngd.KFAC(net(), communicator=SingleProcessCommunicator(), dampng=0.1)
    with pytest.raises(ValueError, match="spngd"):
        ngd.KFAC(net(), communicator=SingleProcessCommunicator(), strategy="spngd")


def test_step_before_backward_and_twice_per_step() -> None:
    model = net()
    opt, kfac = make(model)
    with pytest.raises(RuntimeError, match="before|without a backward"):
        kfac.step()
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    kfac.step()
    with pytest.raises(RuntimeError, match="without a backward pass"):
        kfac.step()


class Functional(nn.Module):
    """Uses the Linear's weight functionally: its hooks never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.functional = nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.linear(self.used(x), self.functional.weight, self.functional.bias)


def test_hooks_that_never_fire_are_reported_by_name() -> None:
    model = Functional()
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator())
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="'functional'.*hooks never fired"):
        kfac.step()


def test_skip_layers_and_unsupported_layers() -> None:
    model = nn.ModuleDict(dict(conv=nn.Conv2d(2, 4, 3, groups=2), emb=nn.Embedding(5, 3, sparse=True),
                               fc=nn.Linear(4, 3), head=nn.Linear(3, 2)))
    with pytest.warns(UserWarning, match="sparse=True"):
        kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), skip_layers=["^fc$"])
    assert [layer.name for layer in kfac.layers] == ["conv#g0", "conv#g1", "head"]
    assert kfac.skipped["fc"] == "matched skip_layers"


def test_no_supported_layer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no supported layer"):
        ngd.KFAC(nn.Sequential(nn.ReLU()), communicator=SingleProcessCommunicator())


def test_ranks_that_register_different_layers_fail_on_every_rank() -> None:
    def body(comm):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2 if comm.rank == 0 else 3))
        specs = [make_layer(n, m)[0].spec for n, m in model.named_modules() if n]
        with pytest.raises(RankMismatchError, match="position 1") as info:
            check_consistent(comm, specs, KFACConfig(damping=0.01 if comm.rank == 0 else 0.02))
        assert "damping" in str(info.value)
        return True

    assert ThreadedWorld(2).run(body) == [True, True]


def test_adasum_is_rejected() -> None:
    hvd = pytest.importorskip("horovod.torch")
    model = net()
    with pytest.raises(ValueError, match="Adasum"):
        ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, op=hvd.Adasum)


def test_grad_scaler_factors_in_unscaled_units() -> None:
    data = batches(4)

    def run(scale):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000) if scale else None
        kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), grad_scaler=scaler, damping=0.01)
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                kfac.step()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                kfac.step()
                scaler.step(opt)
                scaler.update()
        return model, kfac

    plain, kfac_plain = run(None)
    scaled, kfac_scaled = run(1024.0)
    for key, value in kfac_plain.engine.factors.items():
        torch.testing.assert_close(kfac_scaled.engine.factors[key], value, rtol=1e-10, atol=1e-12)
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class RecordingCommunicator(SingleProcessCommunicator):
    """Records which collectives run, and when: rank 0 of a 2-rank world whose other rank
    sends exactly what this one sends (a 1-rank world has nothing to send)."""

    size = 2

    def __init__(self) -> None:
        self.calls = []

    def allgather(self, x, *, name):
        return torch.cat([x, x], 0)

    def allgather_object(self, obj, *, name):
        return [obj, obj]

    def reducescatter(self, x, *, name, average=True):
        return x[0]

    def allreduce_async(self, x, *, name, average=True):
        self.calls.append(("allreduce_async", name))
        return x

    def allreduce(self, x, *, name, average=True):
        self.calls.append(("allreduce", name))
        return x


def test_factor_allreduces_start_during_forward_and_backward() -> None:
    model = net()
    comm = RecordingCommunicator()
    kfac = ngd.KFAC(model, communicator=comm, damping=0.01)
    x, y = batches(1)[0]
    out = model(x)
    assert {n for _, n in comm.calls} == {"hvd_ngd.factor.0/A", "hvd_ngd.factor.3/A"}  # A from forward hooks
    nn.functional.cross_entropy(out, y).backward()
    started = {n for kind, n in comm.calls if kind == "allreduce_async"}
    assert started == {f"hvd_ngd.factor.{k}" for k in ("0/A", "0/G", "1/F", "3/A", "3/G")}
    comm.calls.clear()
    kfac.step()
    assert not [c for c in comm.calls if "factor" in c[1]], "step() re-sent statistics already in flight"


def test_gradient_accumulation_averages_micro_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), factor_decay=0.0, damping=0.01)
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        model(x).pow(2).mean().backward()
    kfac.step()
    assert not kfac.engine.overlap, "early sends must stop once micro-batches accumulate"
    aug = [torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], 1) for x in xs]
    expected = sum(a.T @ a / 4 for a in aug) / 2
    torch.testing.assert_close(kfac.engine.factors["root/A"], expected, rtol=1e-12, atol=0)
