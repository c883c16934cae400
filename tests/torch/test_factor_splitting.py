"""Factor splitting through the torch adapter: the hooks capture whole factors, the engine
keeps their diagonal blocks; training matches a block-diagonal reference step."""

from __future__ import annotations

import torch
from torch import nn

import hvd_ngd.torch as ngd
from hvd_ngd.communicator import SingleProcessCommunicator


def test_split_linear_layer_step_is_block_diagonal_kfac() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    kfac = ngd.KFAC(model, communicator=SingleProcessCommunicator(), reduce_gradients=True, damping=0.1,
                    factor_decay=0.0, kl_clip=None, loss_reduction="sum", factor_blocks={"root/A": 2, "root/G": 2})
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    kfac.step()
    out = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    # reference: hooks' A and G restricted to their diagonal blocks ([3, 3] and [2, 2])
    a = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], 1)
    big_a = a.T @ a / 8
    g = 2 * (model(x) - y).detach()  # per-sample output gradients of the summed loss
    big_g = g.T @ g / 8
    mask_a = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).double()
    mask_g = torch.block_diag(torch.ones(2, 2), torch.ones(2, 2)).double()
    fisher = torch.kron(big_a * mask_a, big_g * mask_g) + 0.1 * torch.eye(24, dtype=torch.float64)
    ref = torch.linalg.solve(fisher, grad.T.reshape(-1)).reshape(6, 4).T
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    assert sorted(kfac.engine.factors) == ["root/A#0", "root/A#1", "root/G#0", "root/G#1"]
