"""Worker of ``test_horovodrun_elastic.py``: an elastic Horovod job training a small float64 MLP
with ``hvd_ngd.torch.DistributedOptimizer`` and ``KFACState``.

Every step uses the same global batch, split evenly over the current ranks, so a run is
comparable with a 1-rank run on the whole batch. Written into ``--out``:

- ``committed_<step>.pt`` (rank 0) at every commit: model, optimizer and the committed
  preconditioner state (gathered from every rank);
- ``<signal>`` (the discovery script's trigger, rank 0) after ``--signal-at`` commits on the
  starting world size; the steps after it are slowed down until Horovod changes the world;
- ``resumed_rank<r>.pt`` (every rank) when training resumes on another world size: the
  statistics this rank holds after the reset and sync;
- ``final_rank<r>.pt`` and ``log_rank<r>.json`` (the world size of every step it ran) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import hvd_ngd.torch as ngd  # noqa: E402
from hvd_ngd.torch.elastic import KFACState  # noqa: E402

GLOBAL_BATCH = 16


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(n: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)) for _ in range(n)]


CONFIG = dict(damping=0.01, factor_update_interval=2, inv_update_interval=3, kl_clip=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--signal-at", type=int, default=5)
    parser.add_argument("--signal", default="remove_worker")
    parser.add_argument("--strategy", default="spngd")
    parser.add_argument("--start-np", type=int, default=2, help="world size the job starts with")
    args = parser.parse_args()
    out = Path(args.out)

    hvd.init()
    torch.set_num_threads(1)
    model = model_fn()
    opt = ngd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                   strategy=args.strategy, **CONFIG)
    state = KFACState(model=model, optimizer=opt, step=0)
    data = batches(args.steps)
    sizes = []

    start_size = args.start_np

    def held() -> dict:
        """What this rank's engine holds (local, no collective)."""
        engine = opt.kfac.engine
        return {"step": state.step, "steps": engine.steps, "size": hvd.size(), "tracker": engine.tracker.state_dict(),
                "factors": {k: engine.ops.to_numpy(v) for k, v in engine.factors.items()},
                "owners": dict(engine.plan.layer_owner)}

    @hvd.elastic.run
    def train(state: KFACState) -> None:
        resumed = out / f"resumed_rank{hvd.rank()}.pt"
        if hvd.size() != start_size and not resumed.exists():
            torch.save(held(), resumed)
        while state.step < args.steps:
            x, y = data[state.step]
            n = GLOBAL_BATCH // hvd.size()
            lo = hvd.rank() * n
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[lo:lo + n]), y[lo:lo + n]).backward()
            opt.step()
            state.step += 1
            sizes.append(hvd.size())
            # state.commit() is save() + check_host_updates(); the committed state is recorded
            # in between, before a pending host update interrupts.
            state.save()
            if hvd.rank() == 0:
                torch.save({"step": state.step, "model": model.state_dict(), "opt": opt.state_dict(),
                            "kfac": state.kfac_handler.committed["kfac"]}, out / f"committed_{state.step}.pt")
                if hvd.size() == start_size and state.step == args.signal_at:
                    (out / args.signal).touch()
            if hvd.size() == start_size and state.step >= args.signal_at:
                time.sleep(0.5)  # give the driver (polling every second) time to notice the new host list
            state.check_host_updates()

    train(state)
    rank = hvd.rank()
    torch.save({"model": model.state_dict(), "size": hvd.size(), "steps": opt.kfac.steps}, out / f"final_rank{rank}.pt")
    (out / f"log_rank{rank}.json").write_text(json.dumps({"sizes": sizes}))


if __name__ == "__main__":
    main()
