"""``hvd_ngd.torch.elastic`` without a cluster: commit / restore / reset / sync of the
preconditioner state on an injected communicator whose world size can change.

A world of 2 or 4 ranks is only simulated for planning (collectives are the identity, as for
one rank), which is what re-planning, process-set registration and the holding filter of
``load_state_dict`` need; the real multi-process run is ``test_horovodrun_elastic.py``.
"""

from __future__ import annotations

import copy
from typing import Any, List, Sequence, Tuple

import pytest

pytest.importorskip("horovod.torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.torch.elastic import KFACStateHandler  # noqa: E402


class ResizableCommunicator(SingleProcessCommunicator):
    """Identity collectives with a settable world size and rank; records what a Horovod
    communicator would be asked to do."""

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1
        self.resets = 0
        self.registered: List[List[Tuple[int, ...]]] = []
        self.objects: List[str] = []

    def reset(self) -> None:
        self.resets += 1

    def register_groups(self, groups: Sequence[Sequence[int]]) -> None:
        self.registered.append([tuple(g) for g in groups])

    def allgather_object(self, obj: Any, *, name: str) -> List[Any]:
        self.objects.append(name)
        return [obj]


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


CFG = dict(strategy="spngd", damping=0.01, factor_update_interval=2, inv_update_interval=3, interval_policy="fixed")


def setup(comm: Any = None, **cfg: Any):
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = ngd.KFAC(model, reduce_gradients=True, communicator=comm or SingleProcessCommunicator(), **{**CFG, **cfg})
    return model, opt, kfac


def train(model: nn.Module, opt: torch.optim.Optimizer, kfac: ngd.KFAC, data) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        kfac.step(lr=opt.param_groups[0]["lr"])
        opt.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_same_state(a: dict, b: dict) -> None:
    """Equal ``KFAC.state_dict()`` outputs (bitwise)."""
    a, b = a["engine"], b["engine"]
    assert a["steps"] == b["steps"] and a["tracker"] == b["tracker"] and a["layer_damping"] == b["layer_damping"]
    for part in ("factors", "inverses"):
        assert set(a[part]) == set(b[part])
    for k in a["factors"]:
        assert (a["factors"][k] == b["factors"][k]).all(), k
    for k in a["inverses"]:
        assert all((x == y).all() for x, y in zip(a["inverses"][k], b["inverses"][k])), k


def test_restore_rolls_back_to_the_commit() -> None:
    data = batches(8)
    model, opt, kfac = setup()
    handler = KFACStateHandler(kfac)
    train(model, opt, kfac, data[:3])
    handler.save()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, kfac, data[3:6])
    expected_params, expected_state = flat(model), kfac.state_dict()
    # A step interrupted between backward and step(), then a rollback.
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[6][0]), data[6][1]).backward()
    handler.restore()
    model.load_state_dict(saved[0])
    opt.load_state_dict(copy.deepcopy(saved[1]))
    assert kfac.steps == 3
    assert_same_state(kfac.state_dict(), handler.committed["kfac"])
    train(model, opt, kfac, data[3:6])
    assert torch.equal(flat(model), expected_params)
    assert_same_state(kfac.state_dict(), expected_state)


@pytest.mark.parametrize("strategy", ["spngd", "comm-opt"])
def test_world_change_replans_and_keeps_every_factor(strategy: str) -> None:
    """1 rank -> 2 ranks (rank 0 holds its share only) -> 1 rank: nothing is lost and the run
    continues bitwise as the run that never resized."""
    data = batches(9)
    ref_model, ref_opt, ref_kfac = setup(strategy=strategy)
    train(ref_model, ref_opt, ref_kfac, data)

    comm = ResizableCommunicator()
    model, opt, kfac = setup(comm, strategy=strategy)
    handler = KFACStateHandler(kfac)
    train(model, opt, kfac, data[:4])
    handler.save()
    committed = copy.deepcopy(handler.committed)
    n_stats = len(committed["kfac"]["engine"]["factors"])
    assert n_stats == 3 * 2 + 1  # three Linear (A, G) and one LayerNorm (F)

    comm.size = 2
    with pytest.raises(RuntimeError, match="world changed"):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data[4][0]), data[4][1]).backward()
        kfac.step()
    kfac.abandon_step()

    resets = comm.resets
    handler.reset()
    assert comm.resets == resets + 1, "the communicator's process-set cache was not cleared"
    assert kfac.engine.world == 2 and kfac.is_current()
    owners = set(kfac.engine.plan.layer_owner.values())
    assert kfac.steps == 4
    if strategy == "spngd":
        assert owners == {0, 1}, f"the 2-rank plan should use both ranks: {kfac.engine.plan.layer_owner}"
        held = set(kfac.engine.factors)
        mine = {k for k in committed["kfac"]["engine"]["factors"] if kfac.engine.layer_owner(k.rsplit("/", 1)[0]) == 0}
        assert held == mine and len(held) < n_stats
    else:
        assert set(kfac.engine.factors) == set(committed["kfac"]["engine"]["factors"])

    comm.size = 1
    handler.reset()
    assert kfac.engine.world == 1 and set(kfac.engine.plan.layer_owner.values()) == {0}
    assert_same_state(kfac.state_dict(), committed["kfac"])
    registered = len(comm.registered)
    train(model, opt, kfac, data[4:])
    assert len(comm.registered) == registered + 1, "the new plan's process sets were not registered at the next step"
    assert torch.equal(flat(model), flat(ref_model))
    assert_same_state(kfac.state_dict(), ref_kfac.state_dict())


def test_sync_checks_registers_and_shares_rank0_state() -> None:
    comm = ResizableCommunicator()
    model, opt, kfac = setup(comm)
    handler = KFACStateHandler(kfac)
    train(model, opt, kfac, batches(3))
    # Nothing committed: the first sync takes rank 0's current state.
    handler.sync()
    assert handler.committed is not None and handler.committed["kfac"]["engine"]["steps"] == 3
    assert_same_state(kfac.state_dict(), handler.committed["kfac"])

    comm.size = 2  # hybrid with grad_worker_fraction 0.5 needs an even world
    model, opt, kfac = setup(comm, strategy="hybrid", grad_worker_fraction=0.5)
    handler = KFACStateHandler(kfac)
    handler.sync()
    handler.committed["kfac"]["engine"]["hyperparameters"]["lr"] = 0.05  # as if rank 0 followed a learning-rate schedule
    comm.size, comm.rank = 4, 2
    comm.objects.clear()
    handler.reset()
    assert kfac.engine.world == 4 and kfac.engine.rank == 2 and kfac.hyperparameters["lr"] == 0.05
    kfac.set_hyperparameters(lr=0.1)  # a joining worker's own value
    handler.sync()
    assert kfac.hyperparameters["lr"] == 0.05, "runtime hyperparameters must come with rank 0's committed state"
    assert "hvd_ngd.consistency" in comm.objects, "sync must compare layers and config across ranks"
    assert comm.registered[-1] == [(0, 1), (2, 3), (0, 2), (1, 3)], comm.registered[-1]


def test_restore_without_commit_starts_over() -> None:
    model, opt, kfac = setup()
    handler = KFACStateHandler(kfac)
    train(model, opt, kfac, batches(2))
    handler.restore()
    assert kfac.steps == 0 and not kfac.engine.factors


def test_handler_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        KFACStateHandler(object())  # type: ignore[arg-type]
