"""The torch adapter's per-step work when no statistic is due: no capture and one tensor hook
per forward pass, whatever the number of layers; preconditioned gradients written back alike
for every layer kind (the fused ``_foreach_copy_``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator


def _mlp(depth: int) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


@pytest.mark.parametrize("depth", [3, 30])
def test_nothing_due_registers_one_hook_and_captures_nothing(depth, monkeypatch) -> None:
    torch.manual_seed(0)
    model = _mlp(depth)
    kfac = ngd.KFAC(model, reduce_gradients=True, communicator=SingleProcessCommunicator(), lr=0.1,
                    factor_update_interval=1000, inv_update_interval=1000)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def train_step() -> None:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert kfac.step()

    train_step()  # step 0: every statistic and inverse is due
    accumulated, hooks = [], []
    monkeypatch.setattr(kfac.engine, "accumulate", lambda *a: accumulated.append(a[:2]))
    real = torch.Tensor.register_hook
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda t, fn: hooks.append(fn) or real(t, fn))
    for _ in range(3):
        train_step()
    assert accumulated == []
    assert len(hooks) == 3  # one backward marker per forward, not one per layer


def test_step_before_backward_still_raises_on_the_fast_path() -> None:
    model = _mlp(2)
    kfac = ngd.KFAC(model, reduce_gradients=True, communicator=SingleProcessCommunicator(), lr=0.1,
                    factor_update_interval=1000, inv_update_interval=1000)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    kfac.step()
    model.zero_grad()
    with torch.no_grad():
        model(x)  # a forward without backward
    with pytest.raises(RuntimeError, match="without a backward pass"):
        kfac.step()


def test_written_gradients_equal_engine_output_for_every_layer_kind() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6, bias=False), nn.LayerNorm(6), nn.Linear(6, 3),
    )
    kfac = ngd.KFAC(model, reduce_gradients=True, communicator=SingleProcessCommunicator(), lr=0.1, kl_clip=None)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    seen = {}
    real_step = kfac.engine.reduce_and_step

    def spy(*args, **kwargs):
        pgrads, others = real_step(*args, **kwargs)
        seen.update({k: v.clone() for k, v in pgrads.items()})
        return pgrads, others

    kfac.engine.reduce_and_step = spy
    assert kfac.step()
    assert seen
    for layer in kfac.layers:
        torch.testing.assert_close(layer.grad_matrix(), seen[layer.name].to(layer.grad_matrix().dtype), rtol=0, atol=0)
