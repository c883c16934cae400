"""The collective term of the cost model, measured on the running Horovod job, is rank 0's on
every rank, so every rank computes the same plan."""

from __future__ import annotations

from hvd_ngd.assignment import SplitPolicy, assign
from hvd_ngd.costs import CostModel
from hvd_ngd.models import resnet50_layer_specs
from hvd_ngd.torch.cost_model import with_horovod_collective


def test_collective_cost_is_measured_and_shared(horovod) -> None:
    own = CostModel("eigen", (1e-10 * (horovod.rank() + 1), 0.0, 1e-5), (1e-11, 1e-10, 1e-6, 1e-6), (1e-9, 1e-6))
    model = with_horovod_collective(own, device="cpu")
    assert model.collective is not None and all(v >= 0 for v in model.collective)
    everyone = horovod.allgather_object(model.to_dict())
    assert all(m == everyone[0] for m in everyone) and everyone[0]["inverse"][0] == 1e-10
    plan = assign(resnet50_layer_specs(), 64, cost_model=model, split=SplitPolicy())
    owners = horovod.allgather_object(sorted((str(t.key), t.owner) for t in plan.tasks))
    assert owners[0] == owners[-1]
