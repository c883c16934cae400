"""``torch.compile``: a compiled model trains with KFAC like the eager one.

KFAC's hooks stay on the original modules and run eagerly (``torch.compiler.disable``): each
registered layer's forward hook is a graph break, so the compiled forward is split at every
registered layer (docs/layers.md gives the measured cost). The capture plan changing between
steps (intervals) must neither change results nor recompile. The Monte-Carlo Fisher
backpropagates twice through one compiled graph, so it needs
``torch._functorch.config.donated_buffer = False`` (a clear error says so otherwise).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator

STEPS = 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(64, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.dw(h)).flatten(1)
        return self.fc2(torch.tanh(self.ln(self.fc1(h))))


def data():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 2, 4, 4, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(STEPS)]


def train(backend, **cfg):
    torch.manual_seed(0)
    model = Net()
    forward = model if backend is None else torch.compile(model, backend=backend)
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), strategy="comm-opt", damping=0.03,
                    factor_update_interval=2, inv_update_interval=3, **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    frames = []
    for x, y in data():
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        kfac.step()
        opt.step()
        frames.append(torch._dynamo.utils.counters["frames"]["ok"])
    return model, kfac, frames


MC = dict(fisher_type="mc", loss_family="cross_entropy")


def mc_cfg():
    return dict(MC, mc_sampler=ngd.fisher.default_sampler(ngd.fisher.LossFamily.CROSS_ENTROPY, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize(
    "backend,tol",
    [("aot_eager", 1e-6), pytest.param("inductor", 1e-4, marks=pytest.mark.skipif(shutil.which("gcc") is None, reason="inductor needs a C compiler"))],
)
def test_compiled_model_trains_like_eager(backend: str, tol: float, fisher: str) -> None:
    torch._dynamo.reset()
    cfg = (lambda: mc_cfg()) if fisher == "mc" else dict
    eager, eager_kfac, _ = train(None, **cfg())
    # the documented pattern for the Monte-Carlo pass, which reuses the forward graph: no donated buffers
    with torch._functorch.config.patch(donated_buffer=fisher != "mc"):
        compiled, kfac, frames = train(backend, **cfg())
    assert frames[1] == frames[-1], f"recompiled after warm-up: compiled frames per step {frames}"
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol, msg=name)
    for key, value in eager_kfac.engine.factors.items():
        torch.testing.assert_close(kfac.engine.factors[key], value, rtol=10 * tol, atol=10 * tol, msg=key)
    assert kfac.steps == STEPS and kfac.engine.fallbacks == []
    if fisher == "mc":
        assert kfac.mc_passes == eager_kfac.mc_passes == STEPS // 2


def test_graph_compiled_before_kfac_is_a_clear_error_and_later_graphs_see_the_hooks() -> None:
    torch._dynamo.reset()
    torch._dynamo.config.skip_nnmodule_hook_guards = True  # torch's default before any KFAC
    x, y = data()[0]
    early = Net()
    compiled = torch.compile(early, backend="eager")
    nn.functional.cross_entropy(compiled(x), y).backward()  # traced without hooks
    kfac = ngd.KFAC(early, communicator=SingleProcessCommunicator(), strategy="comm-opt")
    early.zero_grad()
    nn.functional.cross_entropy(compiled(x), y).backward()
    with pytest.raises(RuntimeError, match="torch.compile"):
        kfac.step()
    # once a KFAC exists, graphs guard on hooks: one traced for a hook-less instance is not
    # reused for another instance with KFAC's hooks
    torch._dynamo.reset()
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    nn.functional.cross_entropy(torch.compile(Net(), backend="eager")(x), y).backward()
    other = Net()
    other_kfac = ngd.KFAC(other, communicator=SingleProcessCommunicator(), strategy="comm-opt")
    nn.functional.cross_entropy(torch.compile(other, backend="eager")(x), y).backward()
    other_kfac.step()
    assert other_kfac.steps == 1
